//! The data cache (`tower_redis_cache::data`) against real Redis, with two
//! instances (two managers, two layers) on one server: coalescing across
//! them, fail-safe, timeouts, eager refresh, tags shared with the HTTP
//! cache, the outage fallback and bad values.
//!
//! Freshness is Redis' wall clock (entries are stamped by Redis when
//! stored), so TTLs here are short real durations, and every wait ends in
//! a generous deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing;
use serde::{Deserialize, Serialize};
use support::{call, operations, request};
use tokio::time::Instant;
use tower_redis_cache::data::{DataCache, DataError, DataOptions};
use tower_redis_cache::{CacheLayer, CacheLayerBuilder, Route};
use tower_redis_core::testing::{TestRedis, wait_for_breaker, wait_for_tracking};
use tower_redis_core::{BreakerState, RedisConfigBuilder, RedisManager, redis};

/// How long any wait of this suite may take.
const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Product {
    id: u32,
    name: String,
}

fn product(name: &str) -> Product {
    Product {
        id: 7,
        name: name.to_owned(),
    }
}

/// One instance: its own manager and layer, the layer's data cache, and
/// an app whose `/products/7` page is tagged `product-7`.
struct Instance {
    manager: RedisManager,
    layer: CacheLayer,
    data: DataCache,
    app: Router,
}

async fn instance(
    redis: &TestRedis,
    tune: impl Fn(CacheLayerBuilder) -> CacheLayerBuilder,
) -> Instance {
    instance_with(redis, tune, Arc::new(AtomicU64::new(0))).await
}

async fn instance_with(
    redis: &TestRedis,
    tune: impl Fn(CacheLayerBuilder) -> CacheLayerBuilder,
    pages: Arc<AtomicU64>,
) -> Instance {
    instance_on(redis.config().failure_threshold(1), tune, pages).await
}

async fn instance_on(
    config: RedisConfigBuilder,
    tune: impl Fn(CacheLayerBuilder) -> CacheLayerBuilder,
    pages: Arc<AtomicU64>,
) -> Instance {
    let manager = RedisManager::connect(config.build().unwrap())
        .await
        .unwrap();
    let layer = tune(
        CacheLayer::builder(manager.clone())
            .route(Route::new("/products/*").tag("product-7"))
            .near_cache(8 << 20, Duration::from_secs(3600)),
    )
    .build()
    .unwrap();
    let counted = Arc::clone(&pages);
    let app = Router::new()
        .route(
            "/products/7",
            routing::get(move || {
                let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
                async move { ([("cache-control", "max-age=3600")], format!("page-{n}")) }
            }),
        )
        .layer(layer.clone());
    Instance {
        manager,
        data: layer.handle().data(),
        layer,
        app,
    }
}

/// An instance that hears of Redis' invalidations 50 ms late (its tracking
/// connection's network is slow), so does every tracked command's answer:
/// with a command timeout well above that, so that a busy machine does
/// not open the breaker.
async fn slow_tracking_instance(redis: &TestRedis) -> Instance {
    let slow = redis
        .slow_tracking_config(Duration::from_millis(50))
        .await
        .command_timeout(Duration::from_secs(2));
    instance_on(slow, |b| b, Arc::new(AtomicU64::new(0))).await
}

/// The data cache of `a` for even callers, of `b` for odd ones: concurrent
/// callers spread over both instances.
fn either(a: &Instance, b: &Instance, caller: usize) -> DataCache {
    if caller.is_multiple_of(2) {
        &a.data
    } else {
        &b.data
    }
    .clone()
}

async fn two(redis: &TestRedis) -> (Instance, Instance) {
    (instance(redis, |b| b).await, instance(redis, |b| b).await)
}

/// A factory counting its calls, answering `name` after `delay`.
fn counted(
    calls: &Arc<AtomicU64>,
    name: &'static str,
    delay: Duration,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Result<Product, String>> + Send>>
+ Send
+ 'static {
    let calls = Arc::clone(calls);
    move || {
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            Ok(product(name))
        })
    }
}

/// A factory that fails.
fn failing(
    calls: &Arc<AtomicU64>,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Result<Product, String>> + Send>>
+ Send
+ 'static {
    let calls = Arc::clone(calls);
    move || {
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Err("the database is down".to_owned())
        })
    }
}

async fn within<F: Future>(what: &str, work: F) -> F::Output {
    tokio::time::timeout(DEADLINE, work)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {DEADLINE:?}"))
}

/// Waits until `check` holds, polling, up to the deadline.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn subscribers(redis: &TestRedis) -> i64 {
    let mut conn = redis.connection().await.unwrap();
    let answer: (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg("tower-redis:cache-events")
        .query_async(&mut conn)
        .await
        .unwrap();
    answer.1
}

/// The one value stored: its hash, its entry's field and the entry.
async fn the_stored_entry(
    conn: &mut redis::aio::MultiplexedConnection,
) -> (String, String, Vec<u8>) {
    let hashes: Vec<String> = redis::cmd("KEYS")
        .arg("tower-redis:c:*")
        .query_async(conn)
        .await
        .unwrap();
    assert_eq!(hashes.len(), 1, "{hashes:?}");
    let fields: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
        .arg(&hashes[0])
        .query_async(conn)
        .await
        .unwrap();
    let (field, entry) = fields
        .into_iter()
        .find(|(name, _)| name.starts_with("e:"))
        .expect("the value's entry");
    (hashes[0].clone(), field, entry)
}

async fn keys(redis: &TestRedis) -> Vec<String> {
    let mut conn = redis.connection().await.unwrap();
    redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// 100 concurrent misses, half on each instance, make one factory call,
/// and every caller gets its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_misses_over_two_instances_make_one_factory_call() {
    let redis = TestRedis::start().await;
    let (a, b) = two(&redis).await;
    let calls = Arc::new(AtomicU64::new(0));
    let options = DataOptions::new(Duration::from_secs(60));
    let mut callers = Vec::new();
    for i in 0..100 {
        let data = either(&a, &b, i);
        let factory = counted(&calls, "herd", Duration::from_millis(300));
        let options = options.clone();
        callers.push(tokio::spawn(async move {
            data.get_or_insert_with("product:herd", &options, factory)
                .await
        }));
    }
    for caller in callers {
        let value = within("a herd caller", caller).await.unwrap();
        assert_eq!(value.unwrap(), product("herd"));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one factory call for the herd"
    );
}

/// A hit is one `HGET`; once copied into the near tier, none. A value
/// that may not live in the near tier is read from Redis every time.
#[tokio::test]
async fn a_hit_is_one_round_trip_and_a_near_hit_none() {
    let redis = TestRedis::start().await;
    let (a, b) = two(&redis).await;
    let options = DataOptions::new(Duration::from_secs(60));
    a.data
        .insert("product:7", &product("lamp"), &options)
        .await
        .unwrap();
    // Start both buses (a lookup does), so that the near tier is usable.
    let _: Option<Product> = b.data.get("product:7").await.unwrap();
    let _: Option<Product> = a.data.get("product:7").await.unwrap();
    eventually("both instances subscribed", || async {
        subscribers(&redis).await == 2
    })
    .await;
    for instance in [&a, &b] {
        wait_for_tracking(&instance.manager, DEADLINE).await;
    }
    // B may hold a near copy from the reads above: A's write ends it
    // (Redis client tracking), and B's sync waits for that word.
    a.data
        .insert("product:7", &product("lamp"), &options)
        .await
        .unwrap();
    b.manager
        .tracking()
        .expect("tracking")
        .sync()
        .await
        .unwrap();
    let (first, commands) = redis
        .commands_during(b.data.get::<Product>("product:7"))
        .await;
    assert_eq!(first.unwrap(), Some(product("lamp")));
    assert_eq!(commands, ["hget"], "a hit from Redis is one HGET");
    let (second, commands) = redis
        .commands_during(b.data.get::<Product>("product:7"))
        .await;
    assert_eq!(second.unwrap(), Some(product("lamp")));
    assert!(
        commands.is_empty(),
        "a near hit costs nothing: {commands:?}"
    );

    // Stored far-only: no read copies it near, plain `get`s included.
    let far = DataOptions::new(Duration::from_secs(60)).near(false);
    a.data
        .insert("product:far", &product("far"), &far)
        .await
        .unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    for _ in 0..2 {
        let (value, commands) = redis
            .commands_during(b.data.get_or_insert_with(
                "product:far",
                &far,
                counted(&calls, "never", Duration::ZERO),
            ))
            .await;
        assert_eq!(value.unwrap(), product("far"));
        assert_eq!(commands, ["hget"], "not kept near: {commands:?}");
        let (value, commands) = redis
            .commands_during(b.data.get::<Product>("product:far"))
            .await;
        assert_eq!(value.unwrap(), Some(product("far")));
        assert_eq!(commands, ["hget"], "not kept near: {commands:?}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

/// Two instances, and `product:7` stored as `v1` by B for the Redis tier
/// alone (`near(false)`), tagged `product-7`, with a fail-safe window; both
/// buses started (a lookup does), so that no subscription is among the
/// commands a test then counts. The options are returned.
async fn stored_on_redis_alone(redis: &TestRedis) -> (Instance, Instance, DataOptions) {
    let (a, b) = two(redis).await;
    let options = DataOptions::new(Duration::from_secs(3600))
        .tag("product-7")
        .near(false)
        .fail_safe(Duration::from_secs(3600));
    b.data
        .insert("product:7", &product("v1"), &options)
        .await
        .unwrap();
    for instance in [&a, &b] {
        let _: Option<Product> = instance.data.get("warm-up").await.unwrap();
    }
    eventually("both instances subscribed", || async {
        subscribers(redis).await == 2
    })
    .await;
    (a, b, options)
}

/// `product:7`, soft-purged, read through `data`: no hit, and a failing
/// factory's caller gets the soft-purged `v1` (fail-safe).
async fn soft_purged_and_kept(data: &DataCache, options: &DataOptions, calls: &Arc<AtomicU64>) {
    assert_eq!(
        data.get::<Product>("product:7").await.unwrap(),
        None,
        "soft-purged: no hit"
    );
    let served = data
        .get_or_insert_with("product:7", options, failing(calls))
        .await
        .unwrap();
    assert_eq!(served, product("v1"), "the soft-purged value, fail-safe");
}

/// A soft purge (of a tag, on another instance) makes a value read from
/// Redis stale: it is no hit any more, and with a fail-safe window it is
/// what a failing factory's caller gets. A value stored after the purge is
/// fresh. The read is one `HGET` of the entry, which carries the mark.
#[tokio::test]
async fn a_soft_purged_value_read_from_redis_is_stale_and_kept_for_fail_safe() {
    let redis = TestRedis::start().await;
    let (a, b, options) = stored_on_redis_alone(&redis).await;
    let calls = Arc::new(AtomicU64::new(0));
    let (read, commands) = redis
        .commands_during(b.data.get::<Product>("product:7"))
        .await;
    assert_eq!(read.unwrap(), Some(product("v1")));
    assert_eq!(commands, ["hget"]);

    let purged = a.layer.handle().soft_purge_tag("product-7").await;
    assert_eq!(purged.urls, 1);
    soft_purged_and_kept(&b.data, &options, &calls).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    b.data
        .insert("product:7", &product("v2"), &options)
        .await
        .unwrap();
    assert_eq!(
        a.data.get::<Product>("product:7").await.unwrap(),
        Some(product("v2")),
        "stored after the purge: fresh"
    );
}

/// A value stored by an earlier version (its envelope without the flag
/// that says soft purges are written into it) is read with the hash's
/// soft-purge mark too: a soft purge that only set the mark (as an
/// earlier version's does) makes it stale. The read is then two `HGET`s.
#[tokio::test]
async fn a_value_stored_by_an_earlier_version_is_read_with_the_hash_mark() {
    let redis = TestRedis::start().await;
    let (a, _b, options) = stored_on_redis_alone(&redis).await;
    let calls = Arc::new(AtomicU64::new(0));
    // The value's hash (the one hash stored), and its entry made as an
    // earlier version made it: the flag cleared.
    let mut conn = redis.connection().await.unwrap();
    let (hash, field, mut entry) = the_stored_entry(&mut conn).await;
    let envelope = entry
        .windows(3)
        .position(|w| w == b"TRD")
        .expect("the value's envelope");
    assert_eq!(entry[envelope + 12] & 2, 2, "stored now: the flag set");
    entry[envelope + 12] &= !2;
    let _: () = redis::cmd("HSET")
        .arg(&hash)
        .arg(&field)
        .arg(entry)
        .query_async(&mut conn)
        .await
        .unwrap();

    let (read, commands) = redis
        .commands_during(a.data.get::<Product>("product:7"))
        .await;
    assert_eq!(read.unwrap(), Some(product("v1")), "no mark yet: fresh");
    assert_eq!(commands, ["hget", "hget"], "the entry, then the mark");

    // An earlier version's soft purge: the mark alone, Redis' clock.
    let _: () = redis::cmd("HSET")
        .arg(&hash)
        .arg("sp")
        .arg(redis.time_ms().await.unwrap())
        .query_async(&mut conn)
        .await
        .unwrap();
    soft_purged_and_kept(&a.data, &options, &calls).await;
}

/// With a fail-safe window, a factory error serves the expired value, and
/// for the throttle the other instance is served it too without asking
/// its factory. Without one, the caller gets the factory's error.
#[tokio::test]
async fn fail_safe_serves_the_expired_value_when_the_factory_fails() {
    let redis = TestRedis::start().await;
    let (a, b) = two(&redis).await;
    let calls = Arc::new(AtomicU64::new(0));
    let options = DataOptions::new(Duration::from_millis(300))
        .fail_safe(Duration::from_secs(60))
        .fail_safe_throttle(Duration::from_secs(30));
    let first = a
        .data
        .get_or_insert_with("product:7", &options, counted(&calls, "v1", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(first, product("v1"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let served = a
        .data
        .get_or_insert_with("product:7", &options, failing(&calls))
        .await
        .unwrap();
    assert_eq!(served, product("v1"), "the expired value, fail-safe");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let throttled = b
        .data
        .get_or_insert_with("product:7", &options, counted(&calls, "v2", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(
        throttled,
        product("v1"),
        "throttled: the failing source is left alone"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    let no_fail_safe = DataOptions::new(Duration::from_millis(300));
    a.data
        .insert("product:8", &product("v1"), &no_fail_safe)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    gets_the_factory_s_error(&a, "product:8", &no_fail_safe, &calls).await;
}

/// A failing factory's caller gets its error for `key`: no expired value
/// is served.
async fn gets_the_factory_s_error(
    a: &Instance,
    key: &str,
    options: &DataOptions,
    calls: &Arc<AtomicU64>,
) {
    let error = a
        .data
        .get_or_insert_with(key, options, failing(calls))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, DataError::Factory(message) if message == "the database is down"),
        "{key}: an expired value was served, or another error: {error:?}"
    );
}

/// Fail-safe serves an expired value only within its window past the
/// TTL, though the value's hash may live longer in Redis: a value stored
/// within a removal's tombstone (60 s by default) keeps the hash until the
/// tombstone's end. Past the window a failing factory's caller gets the
/// factory's error; within it, the expired value.
#[tokio::test]
async fn fail_safe_serves_an_expired_value_only_within_its_window() {
    let redis = TestRedis::start().await;
    let a = instance(&redis, |b| b).await;
    let calls = Arc::new(AtomicU64::new(0));
    let options = DataOptions::new(Duration::from_millis(200))
        .fail_safe(Duration::from_millis(1_500))
        .near(false);
    for key in ["product:8", "product:9"] {
        a.data.insert(key, &product("old"), &options).await.unwrap();
        a.data.remove(key).await.unwrap();
        a.data
            .insert(key, &product("kept"), &options)
            .await
            .unwrap();
    }
    // Expired (200 ms), within the window (200 + 1,500 ms).
    tokio::time::sleep(Duration::from_millis(400)).await;
    let served = a
        .data
        .get_or_insert_with("product:8", &options, failing(&calls))
        .await
        .unwrap();
    assert_eq!(served, product("kept"), "the expired value, fail-safe");
    // Past the window, while the tombstone keeps the hash in Redis.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    gets_the_factory_s_error(&a, "product:9", &options, &calls).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Past the hard timeout a caller gets the expired value (or, without
/// one, `Timeout`) at once, and the factory's value lands when it is done.
#[tokio::test]
async fn a_hard_timeout_serves_the_expired_value_and_the_late_value_lands() {
    let redis = TestRedis::start().await;
    let (a, b) = two(&redis).await;
    let calls = Arc::new(AtomicU64::new(0));
    let options = DataOptions::new(Duration::from_millis(300))
        .fail_safe(Duration::from_secs(60))
        .hard_timeout(Duration::from_millis(100));
    a.data
        .insert("product:7", &product("v1"), &options)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let started = Instant::now();
    let served = within(
        "the timed-out call",
        a.data.get_or_insert_with(
            "product:7",
            &options,
            counted(&calls, "v2", Duration::from_secs(1)),
        ),
    )
    .await
    .unwrap();
    assert_eq!(served, product("v1"));
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "did not wait for the factory"
    );
    eventually("the late value stored", || async {
        b.data.get::<Product>("product:7").await.unwrap() == Some(product("v2"))
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let error = a
        .data
        .get_or_insert_with(
            "product:new",
            &options,
            counted(&calls, "v3", Duration::from_millis(500)),
        )
        .await
        .unwrap_err();
    assert!(matches!(error, DataError::Timeout(_)), "{error:?}");
    eventually("the late value stored", || async {
        b.data.get::<Product>("product:new").await.unwrap() == Some(product("v3"))
    })
    .await;
}

/// Past the soft timeout a caller gets the expired value while the
/// factory goes on; its value lands, and is what the next caller (on the
/// other instance) gets, without another factory call.
#[tokio::test]
async fn a_soft_timeout_serves_the_expired_value_and_the_background_value_lands() {
    let redis = TestRedis::start().await;
    let (a, b) = two(&redis).await;
    let calls = Arc::new(AtomicU64::new(0));
    let options = DataOptions::new(Duration::from_millis(300))
        .fail_safe(Duration::from_secs(60))
        .soft_timeout(Duration::from_millis(50))
        .hard_timeout(Duration::from_secs(5));
    a.data
        .insert("product:7", &product("v1"), &options)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let served = within(
        "the soft-timed-out call",
        a.data.get_or_insert_with(
            "product:7",
            &options,
            counted(&calls, "v2", Duration::from_millis(500)),
        ),
    )
    .await
    .unwrap();
    assert_eq!(served, product("v1"));
    eventually("the background value stored", || async {
        b.data.get::<Product>("product:7").await.unwrap() == Some(product("v2"))
    })
    .await;
    let next = b
        .data
        .get_or_insert_with("product:7", &options, counted(&calls, "v3", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(next, product("v2"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Hits past the eager-refresh fraction of the TTL, many on both
/// instances at once, are served the current value and refresh it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eager_refresh_happens_exactly_once_across_instances() {
    let redis = TestRedis::start().await;
    let (a, b) = two(&redis).await;
    let calls = Arc::new(AtomicU64::new(0));
    let options = DataOptions::new(Duration::from_secs(3)).eager_refresh(0.3);
    a.data
        .insert("product:7", &product("v1"), &options)
        .await
        .unwrap();
    // Before the fraction: plain hits.
    let early = a
        .data
        .get_or_insert_with(
            "product:7",
            &options,
            counted(&calls, "early", Duration::ZERO),
        )
        .await
        .unwrap();
    assert_eq!(early, product("v1"));
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let mut callers = Vec::new();
    for i in 0..40 {
        let data = either(&a, &b, i);
        let factory = counted(&calls, "v2", Duration::from_millis(200));
        let options = options.clone();
        callers.push(tokio::spawn(async move {
            data.get_or_insert_with("product:7", &options, factory)
                .await
        }));
    }
    for caller in callers {
        let value = within("a hit", caller).await.unwrap().unwrap();
        assert_eq!(value, product("v1"), "hits are served the current value");
    }
    for data in [&a.data, &b.data] {
        eventually("the refreshed value", || async {
            data.get::<Product>("product:7").await.unwrap() == Some(product("v2"))
        })
        .await;
    }
    // Hits after the refresh (and near copies read before it) start none.
    for data in [&a.data, &b.data] {
        let value = data
            .get_or_insert_with("product:7", &options, counted(&calls, "v3", Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(value, product("v2"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one eager refresh");
}

/// One `purge_tag` on A removes the tagged data value and the tagged page,
/// in Redis and in B's near tier.
#[tokio::test]
async fn a_tag_purge_on_a_removes_data_and_pages_everywhere_near_tiers_included() {
    let redis = TestRedis::start().await;
    // One origin behind both instances: its page number counts its calls.
    let pages = Arc::new(AtomicU64::new(0));
    let a = instance_with(&redis, |b| b, Arc::clone(&pages)).await;
    let b = instance_with(&redis, |b| b, Arc::clone(&pages)).await;
    let options = DataOptions::new(Duration::from_secs(3600)).tag("product-7");
    a.data
        .insert("product:7", &product("lamp"), &options)
        .await
        .unwrap();
    let page = call(&a.app, request("/products/7", &[])).await;
    assert_eq!(page.body, "page-1");
    a.layer.flush().await;
    // B reads the value from Redis, then from its near tier.
    assert!(b.data.get::<Product>("product:7").await.unwrap().is_some());
    eventually("both instances subscribed", || async {
        subscribers(&redis).await >= 2
    })
    .await;
    eventually("B's near copy", || async {
        let (value, commands) = redis
            .commands_during(b.data.get::<Product>("product:7"))
            .await;
        value.unwrap().is_some() && commands.is_empty()
    })
    .await;
    let page = call(&b.app, request("/products/7", &[])).await;
    assert_eq!(page.body, "page-1", "the page is shared");

    let purged = a.layer.handle().purge_tag("product-7").await;
    assert_eq!(purged.urls, 2, "the page and the value");
    eventually("B no longer has the value", || async {
        b.data.get::<Product>("product:7").await.unwrap().is_none()
    })
    .await;
    // The page's near copy goes with its own purge message.
    let mut page = call(&b.app, request("/products/7", &[])).await;
    let deadline = Instant::now() + DEADLINE;
    while page.body == "page-1" {
        assert!(Instant::now() < deadline, "B still serves the purged page");
        tokio::time::sleep(Duration::from_millis(20)).await;
        page = call(&b.app, request("/products/7", &[])).await;
    }
    assert_eq!(page.body, "page-2", "the page was purged too");
    assert_eq!(pages.load(Ordering::SeqCst), 2);

    // And from the data side.
    a.data
        .insert("product:7", &product("lamp"), &options)
        .await
        .unwrap();
    b.data.purge_tag("product-7").await;
    assert!(a.data.get::<Product>("product:7").await.unwrap().is_none());
}

/// Redis killed: values are made and cached in process (one factory call,
/// then hits); Redis back: the in-process copies go, values are shared
/// through Redis again.
#[tokio::test]
async fn an_outage_caches_in_process_then_values_are_shared_again() {
    let redis = TestRedis::start().await;
    let (a, b) = two(&redis).await;
    let calls = Arc::new(AtomicU64::new(0));
    let options = DataOptions::new(Duration::from_secs(60));
    let _: Option<Product> = a.data.get("warm-up").await.unwrap();
    redis.kill().await;
    for data in [&a.data, &b.data] {
        for _ in 0..3 {
            let value = within(
                "a call during the outage",
                data.get_or_insert_with(
                    "product:7",
                    &options,
                    counted(&calls, "outage", Duration::ZERO),
                ),
            )
            .await
            .unwrap();
            assert_eq!(value, product("outage"));
        }
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "cached in each process (no cross-instance lock without Redis)"
    );
    assert!(!a.manager.is_available() && !b.manager.is_available());

    redis.restart().await;
    wait_for_breaker(&a.manager, BreakerState::Closed, Duration::from_secs(15)).await;
    wait_for_breaker(&b.manager, BreakerState::Closed, Duration::from_secs(15)).await;
    let back = a
        .data
        .get_or_insert_with(
            "product:7",
            &options,
            counted(&calls, "shared", Duration::ZERO),
        )
        .await
        .unwrap();
    assert_eq!(back, product("shared"), "the in-process copy is dropped");
    let on_b = b
        .data
        .get_or_insert_with(
            "product:7",
            &options,
            counted(&calls, "never", Duration::ZERO),
        )
        .await
        .unwrap();
    assert_eq!(on_b, product("shared"), "shared through Redis again");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ProductV2 {
    id: u32,
    name: String,
    price_cents: u64,
}

/// A stored value that no longer decodes (its type changed) is a miss and
/// is deleted; the factory's value replaces it.
#[tokio::test]
async fn a_value_that_does_not_decode_is_a_miss_and_is_deleted() {
    let redis = TestRedis::start().await;
    let (a, b) = two(&redis).await;
    let options = DataOptions::new(Duration::from_secs(60));
    a.data
        .insert("product:7", &product("lamp"), &options)
        .await
        .unwrap();
    let before = keys(&redis).await.len();
    let found = b.data.get::<ProductV2>("product:7").await.unwrap();
    assert_eq!(found, None);
    assert!(
        a.data.get::<Product>("product:7").await.unwrap().is_none(),
        "the undecodable value was deleted"
    );
    assert_eq!(keys(&redis).await.len(), before - 1);
    let fresh = b
        .data
        .get_or_insert_with("product:7", &options, || async {
            Ok::<_, String>(ProductV2 {
                id: 7,
                name: "lamp".to_owned(),
                price_cents: 1_999,
            })
        })
        .await
        .unwrap();
    assert_eq!(fresh.price_cents, 1_999);
    assert_eq!(
        a.data.get::<ProductV2>("product:7").await.unwrap(),
        Some(fresh)
    );
}

/// Bytes in Redis that are no value at all (corrupt, foreign) are a miss
/// and are deleted too.
#[tokio::test]
async fn a_corrupt_stored_value_is_a_miss_and_is_deleted() {
    let redis = TestRedis::start().await;
    let a = instance(&redis, |b| b).await;
    let options = DataOptions::new(Duration::from_secs(60)).near(false);
    a.data
        .insert("product:7", &product("lamp"), &options)
        .await
        .unwrap();
    let mut conn = redis.connection().await.unwrap();
    let (hash, field, _) = the_stored_entry(&mut conn).await;
    let _: () = redis::cmd("HSET")
        .arg(&hash)
        .arg(&field)
        .arg("TRC\x01 garbage")
        .query_async(&mut conn)
        .await
        .unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    assert_eq!(a.data.get::<Product>("product:7").await.unwrap(), None);
    let exists: bool = redis::cmd("HEXISTS")
        .arg(&hash)
        .arg(&field)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists, "the corrupt value was deleted");
    let made = a
        .data
        .get_or_insert_with(
            "product:7",
            &options,
            counted(&calls, "made", Duration::ZERO),
        )
        .await
        .unwrap();
    assert_eq!(made, product("made"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A value over the size limit is returned but not stored.
#[tokio::test]
async fn a_value_over_the_limit_is_returned_and_not_stored() {
    let redis = TestRedis::start().await;
    let a = instance(&redis, |b| b.max_body_bytes(256)).await;
    let calls = Arc::new(AtomicU64::new(0));
    let options = DataOptions::new(Duration::from_secs(60));
    for expected_calls in 1..=2 {
        let counter = Arc::clone(&calls);
        let value = a
            .data
            .get_or_insert_with("big", &options, move || async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>("x".repeat(1_000))
            })
            .await
            .unwrap();
        assert_eq!(value.len(), 1_000);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            expected_calls,
            "not stored, so each call makes the value"
        );
    }
    assert!(a.data.get::<String>("big").await.unwrap().is_none());
    let small = a
        .data
        .get_or_insert_with("small", &options, || async {
            Ok::<_, String>("x".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(small, "x");
    assert_eq!(
        a.data.get::<String>("small").await.unwrap().as_deref(),
        Some("x")
    );
}

/// A factory that panics gives its caller `Panicked`; the callers waiting
/// for it (on this instance and the other) are not stuck behind the key:
/// one of them makes the value. The lock and coalescing waits are 60 s
/// here, so a key left held would fail the 10 s deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_factory_does_not_poison_the_key() {
    let redis = TestRedis::start().await;
    let slow = |b: CacheLayerBuilder| {
        b.lock_ttl(Duration::from_secs(60))
            .coalesce(Some(Duration::from_secs(60)))
    };
    let a = instance(&redis, slow).await;
    let b = instance(&redis, slow).await;
    let calls = Arc::new(AtomicU64::new(0));
    let options = DataOptions::new(Duration::from_secs(60));
    let mut callers = Vec::new();
    for i in 0..20 {
        let data = either(&a, &b, i);
        let calls = Arc::clone(&calls);
        let options = options.clone();
        callers.push(tokio::spawn(async move {
            data.get_or_insert_with("product:7", &options, move || async move {
                let call = calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert!(call != 0, "the first factory call panics");
                Ok::<_, String>(product("made"))
            })
            .await
        }));
        if i == 0 {
            // The panicking call leads.
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    let mut panicked = 0;
    for caller in callers {
        match within("a caller", caller).await.unwrap() {
            Ok(value) => assert_eq!(value, product("made")),
            Err(DataError::Panicked) => panicked += 1,
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!(panicked, 1, "only the panicking factory's caller fails");
    assert!(calls.load(Ordering::SeqCst) >= 2);
    assert_eq!(
        a.data.get::<Product>("product:7").await.unwrap(),
        Some(product("made"))
    );
}

/// Keys are checked: empty and over-long keys are typed errors, and a
/// data value lives under the manager's key prefix.
#[tokio::test]
async fn keys_are_checked_and_namespaced() {
    let redis = TestRedis::start().await;
    let a = instance(&redis, |b| b).await;
    assert!(a.data.get::<Product>("").await.is_err());
    let long = "k".repeat(2_000);
    let error = a
        .data
        .get_or_insert_with(&long, &DataOptions::default(), || async {
            Ok::<_, String>(product("never"))
        })
        .await
        .unwrap_err();
    assert!(matches!(error, DataError::InvalidKey(_)), "{error:?}");
    a.data
        .insert("product:7", &product("lamp"), &DataOptions::default())
        .await
        .unwrap();
    let keys = keys(&redis).await;
    assert!(!keys.is_empty());
    assert!(
        keys.iter().all(|k| k.starts_with("tower-redis:")),
        "{keys:?}"
    );
}

/// The JSON codec, counting the values it decodes.
#[derive(Clone)]
struct CountingJson(Arc<AtomicU64>);

impl tower_redis_cache::data::Codec for CountingJson {
    fn encode<T: Serialize>(
        &self,
        value: &T,
    ) -> Result<Vec<u8>, tower_redis_cache::data::CodecError> {
        tower_redis_cache::data::Json.encode(value)
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        bytes: &[u8],
    ) -> Result<T, tower_redis_cache::data::CodecError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        tower_redis_cache::data::Json.decode(bytes)
    }
}

/// Only the name of a product: the same stored value, read as another type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ProductName {
    name: String,
}

/// A loop of near hits lets the runtime run its other tasks: a near hit
/// uses no Tokio resource that would make its task yield, so it spends the
/// task's budget itself. Without that, on this single-threaded runtime the
/// spawned task below would not run before the loop ends (and on any
/// runtime, Redis replies waiting behind such a loop would miss their
/// deadline and open the breaker).
#[tokio::test]
async fn a_loop_of_near_hits_lets_the_runtimes_other_tasks_run() {
    let redis = TestRedis::start().await;
    let a = instance(&redis, |b| b).await;
    let options = DataOptions::new(Duration::from_secs(60));
    a.data
        .insert("product:7", &product("lamp"), &options)
        .await
        .unwrap();
    let _: Option<Product> = a.data.get("warm-up").await.unwrap();
    wait_for_tracking(&a.manager, DEADLINE).await;
    let never = Arc::new(AtomicU64::new(0));
    // The first read copies the value near.
    let first = a
        .data
        .get_or_insert_with(
            "product:7",
            &options,
            counted(&never, "never", Duration::ZERO),
        )
        .await;
    assert_eq!(first.unwrap(), product("lamp"));

    // `get_or_insert_with`, then `get`.
    for api in ["get_or_insert_with", "get"] {
        let ran = Arc::new(AtomicBool::new(false));
        let (hits, commands) = redis
            .commands_during(async {
                // Spawned here, after the monitoring has started: from now
                // on only a yield of this loop lets it run.
                tokio::spawn({
                    let ran = Arc::clone(&ran);
                    async move { ran.store(true, Ordering::SeqCst) }
                });
                let mut hits = 0;
                // Ends when the spawned task has run, or after 10,000 hits.
                while hits < 10_000 && !ran.load(Ordering::SeqCst) {
                    let value = if api == "get" {
                        a.data.get::<Product>("product:7").await.unwrap()
                    } else {
                        let factory = counted(&never, "never", Duration::ZERO);
                        let value = a.data.get_or_insert_with("product:7", &options, factory);
                        Some(value.await.unwrap())
                    };
                    assert_eq!(value, Some(product("lamp")));
                    hits += 1;
                }
                hits
            })
            .await;
        assert!(hits > 1, "{api}: the spawned task ran before the first hit");
        assert!(commands.is_empty(), "{api}: near hits only: {commands:?}");
        assert!(
            hits < 10_000,
            "{api}: {hits} near hits in a row never let another task run"
        );
    }
    assert_eq!(never.load(Ordering::SeqCst), 0);
}

/// A near hit is a clone of the value decoded when it was copied near: no
/// Redis command, no decoding. The decoded copy goes with the near copy:
/// another instance's write replaces it, a soft purge makes it stale, and
/// the same key read as another type decodes the stored value (and back).
#[tokio::test]
async fn a_near_hit_is_the_decoded_value_and_goes_with_the_near_copy() {
    let redis = TestRedis::start().await;
    let (a, b) = two(&redis).await;
    let decodes = Arc::new(AtomicU64::new(0));
    let on_b = b
        .data
        .clone()
        .with_codec(CountingJson(Arc::clone(&decodes)));
    let options = DataOptions::new(Duration::from_secs(60)).tag("product-7");
    a.data
        .insert("product:7", &product("lamp"), &options)
        .await
        .unwrap();
    let _: Option<Product> = on_b.get("warm-up").await.unwrap();
    wait_for_tracking(&b.manager, DEADLINE).await;
    let first = on_b.get::<Product>("product:7").await.unwrap();
    assert_eq!(first, Some(product("lamp")));
    let decoded = decodes.load(Ordering::SeqCst);
    assert_eq!(decoded, 1, "read from Redis and decoded once");
    for _ in 0..3 {
        let (value, commands) = redis
            .commands_during(on_b.get_or_insert_with(
                "product:7",
                &options,
                counted(&Arc::new(AtomicU64::new(0)), "never", Duration::ZERO),
            ))
            .await;
        assert_eq!(value.unwrap(), product("lamp"));
        assert!(commands.is_empty(), "a near hit: {commands:?}");
    }
    assert_eq!(
        decodes.load(Ordering::SeqCst),
        decoded,
        "near hits hand back the decoded value"
    );

    // Another instance's write: B's copies go (client tracking).
    a.data
        .insert("product:7", &product("desk lamp"), &options)
        .await
        .unwrap();
    b.manager.tracking().unwrap().sync().await.unwrap();
    assert_eq!(
        on_b.get::<Product>("product:7").await.unwrap(),
        Some(product("desk lamp")),
        "the decoded copy went with the near copy"
    );
    assert_eq!(
        on_b.get::<Product>("product:7").await.unwrap(),
        Some(product("desk lamp"))
    );

    // The same key as another type: decoded from the stored value, and
    // back, each answer right.
    for _ in 0..2 {
        let name = on_b.get::<ProductName>("product:7").await.unwrap();
        assert_eq!(
            name,
            Some(ProductName {
                name: "desk lamp".to_owned()
            })
        );
        let whole = on_b.get::<Product>("product:7").await.unwrap();
        assert_eq!(whole, Some(product("desk lamp")));
    }

    // A decoded copy is fresh as long as its value is: past the TTL (the
    // value kept in Redis for fail-safe), a read is no hit.
    let brief = DataOptions::new(Duration::from_millis(300)).fail_safe(Duration::from_secs(60));
    a.data
        .insert("product:brief", &product("brief"), &brief)
        .await
        .unwrap();
    b.manager.tracking().unwrap().sync().await.unwrap();
    assert_eq!(
        on_b.get::<Product>("product:brief").await.unwrap(),
        Some(product("brief"))
    );
    let (value, commands) = redis
        .commands_during(on_b.get::<Product>("product:brief"))
        .await;
    assert_eq!(value.unwrap(), Some(product("brief")));
    assert!(commands.is_empty(), "a near hit: {commands:?}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        on_b.get::<Product>("product:brief").await.unwrap(),
        None,
        "stale past its TTL"
    );

    // A soft purge on A makes B's value stale: not a fresh hit any more.
    let purged = a.layer.handle().soft_purge_tag("product-7").await;
    assert_eq!(purged.urls, 1);
    b.manager.tracking().unwrap().sync().await.unwrap();
    assert_eq!(on_b.get::<Product>("product:7").await.unwrap(), None);
}

/// The commands Redis ran between two `INFO commandstats`, by name,
/// without the test's own (`INFO`, `MONITOR` and its marker, connection
/// setup) and the tracking connection's heartbeat.
async fn ran_since(
    redis: &TestRedis,
    before: &std::collections::HashMap<String, u64>,
) -> std::collections::BTreeMap<String, u64> {
    let after = redis.command_calls().await.unwrap();
    after
        .into_iter()
        .filter(|(name, _)| {
            !["ping", "info", "monitor", "echo"].contains(&name.as_str())
                && !name.starts_with("client")
                && !name.starts_with("hello")
        })
        .map(|(name, calls)| {
            let delta = calls - before.get(&name).copied().unwrap_or(0);
            (name, delta)
        })
        .filter(|(_, delta)| *delta > 0)
        .collect()
}

/// A miss is the lookup, the fill lock, and one pipelined write (the
/// value's script and its root index record): four commands from the
/// client, nineteen run by Redis with what the scripts run (eighteen
/// before the index looked for a purge mark). It was six and twenty-nine:
/// a second index (the key's directory), the variants bound and the checks
/// a value that does not exist yet cannot need in the scripts, and an
/// announcement nobody waited for. With a waiter on
/// another instance, the value is announced.
#[tokio::test]
async fn a_miss_is_four_commands_and_announces_only_to_waiters() {
    let redis = TestRedis::start().await;
    let a = instance(&redis, |b| b).await;
    let options = DataOptions::new(Duration::from_secs(60)).near(false);
    let calls = Arc::new(AtomicU64::new(0));
    // Loads the scripts (the first miss sends `SCRIPT LOAD`s).
    let warm_up = Arc::new(AtomicU64::new(0));
    a.data
        .get_or_insert_with(
            "warm-up",
            &options,
            counted(&warm_up, "warm-up", Duration::ZERO),
        )
        .await
        .unwrap();
    eventually("A subscribed", || async { subscribers(&redis).await == 1 }).await;
    let expected: std::collections::BTreeMap<String, u64> = [
        // The lookup.
        ("hget", 1),
        // The lock's look at the value's hash.
        ("hmget", 1),
        // The lock, the value, the root index.
        ("evalsha", 3),
        // The lock's and the index's expiry checks.
        ("pttl", 2),
        // The lock, the value.
        ("hset", 2),
        // The new hash's, the value's, the index's expiry.
        ("pexpire", 3),
        // The lock released.
        ("hdel", 1),
        ("zremrangebyscore", 1),
        // The root index's purge mark, looked for.
        ("zscore", 1),
        ("zadd", 1),
        // The three scripts' clocks, and the monitor's marker.
        ("time", 4),
    ]
    .into_iter()
    .map(|(name, calls)| (name.to_owned(), calls))
    .collect();
    for n in 0..3 {
        let key = format!("product:{n}");
        let before = redis.command_calls().await.unwrap();
        let (value, commands) = redis
            .commands_during(a.data.get_or_insert_with(
                &key,
                &options,
                counted(&calls, "made", Duration::ZERO),
            ))
            .await;
        let ran = ran_since(&redis, &before).await;
        assert_eq!(value.unwrap(), product("made"));
        assert_eq!(
            commands,
            ["hget", "evalsha", "evalsha", "evalsha"],
            "a miss: lookup, lock, value and root index"
        );
        assert_eq!(ran, expected, "what Redis ran for a miss");
        assert_eq!(ran.values().sum::<u64>() - 1, 19);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // A waiter on another instance: the value is announced to it.
    let b = instance(&redis, |b| b).await;
    let _: Option<Product> = b.data.get("warm-up").await.unwrap();
    eventually("B subscribed", || async { subscribers(&redis).await == 2 }).await;
    let before = redis.command_calls().await.unwrap();
    let slow = counted(&calls, "slow", Duration::from_millis(300));
    let leader = {
        let data = a.data.clone();
        let options = options.clone();
        tokio::spawn(async move {
            data.get_or_insert_with("product:herd", &options, slow)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiter = within(
        "B waiting for A's value",
        b.data.get_or_insert_with(
            "product:herd",
            &options,
            counted(&calls, "never", Duration::ZERO),
        ),
    )
    .await
    .unwrap();
    assert_eq!(waiter, product("slow"));
    assert_eq!(within("A", leader).await.unwrap().unwrap(), product("slow"));
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    let ran = ran_since(&redis, &before).await;
    assert_eq!(
        ran.get("publish"),
        Some(&1),
        "announced to the waiter: {ran:?}"
    );
}

/// A value removed while its factory runs: the factory's value, made
/// before the removal, is returned to its caller but not stored after it,
/// so the next read is a miss.
#[tokio::test]
async fn a_fill_that_began_before_a_remove_does_not_store_after_it() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let (_redis, _a) = removed_while_its_factory_runs(|b| b, 300).await;
    assert_eq!(
        support::dropped_fills(recorder.snapshotter().snapshot()),
        [("data".to_owned(), "purged".to_owned(), 1)]
    );
}

/// A factory slower than a removal's tombstone lives (twelve fill lock
/// lifetimes, at least 2 s: here the lock lives 100 ms) cannot be checked
/// against a removal made early in it: its value is returned to its
/// caller but not stored, so the next read is a miss.
#[tokio::test]
async fn a_fill_slower_than_a_tombstone_lives_does_not_store_what_a_removal_removed() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let (_redis, a) =
        removed_while_its_factory_runs(|b| b.lock_ttl(Duration::from_millis(100)), 3_000).await;
    assert_eq!(
        support::dropped_fills(recorder.snapshotter().snapshot()),
        [("data".to_owned(), "too_slow".to_owned(), 1)]
    );
    // A factory as fast as usual, with the same lock, stores its value.
    let options = DataOptions::new(Duration::from_secs(60)).near(false);
    a_new_fill_is_stored(&a, &options, &recorder).await;
}

/// A fill of `product:9` (`new`) with `options` is returned, stored, and
/// counted as no drop in `recorder`.
async fn a_new_fill_is_stored(
    a: &Instance,
    options: &DataOptions,
    recorder: &metrics_util::debugging::DebuggingRecorder,
) {
    let new = a
        .data
        .get_or_insert_with("product:9", options, || async {
            Ok::<_, String>(product("new"))
        })
        .await
        .unwrap();
    assert_eq!(new, product("new"));
    assert_eq!(
        a.data.get::<Product>("product:9").await.unwrap(),
        Some(product("new"))
    );
    assert_eq!(
        support::dropped_fills(recorder.snapshotter().snapshot()),
        []
    );
}

/// As for pages: a factory that outlives its fill lock, which another
/// instance then takes over, is not stored where the value holds a
/// removal's tombstone, even one older than the factory's start, and is
/// counted as `lock_lost` (the cure is a longer `lock_ttl`), not as
/// purged. The other instance's value is stored.
#[tokio::test]
async fn a_factory_that_outlives_its_lock_after_an_older_removal_is_counted_as_lock_lost() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let redis = TestRedis::start().await;
    let short_lock = |b: CacheLayerBuilder| b.lock_ttl(Duration::from_millis(300));
    let a = Arc::new(instance(&redis, short_lock).await);
    let b = instance(&redis, short_lock).await;
    let options = DataOptions::new(Duration::from_secs(60)).near(false);
    a.data
        .insert("product:9", &product("first"), &options)
        .await
        .unwrap();
    a.data.remove("product:9").await.unwrap();
    // Older than the factory's start by more than the second's margin a
    // fill adds to its age.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let filling = filling_old_until(&a, tokio::time::sleep(Duration::from_millis(1_500))).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let new = b
        .data
        .get_or_insert_with("product:9", &options, || async {
            Ok::<_, String>(product("new"))
        })
        .await
        .unwrap();
    assert_eq!(new, product("new"));
    assert_eq!(filling.await.unwrap().unwrap(), product("old"));
    assert_eq!(
        b.data.get::<Product>("product:9").await.unwrap(),
        Some(product("new"))
    );
    assert_eq!(
        support::dropped_fills(recorder.snapshotter().snapshot()),
        [("data".to_owned(), "lock_lost".to_owned(), 1)]
    );
}

/// `product:9` removed while its factory, which takes `factory_ms`, runs
/// on an instance built with `tune`: the factory's value is returned to
/// its caller and not stored after the removal (the next read is a miss).
async fn removed_while_its_factory_runs(
    tune: impl Fn(CacheLayerBuilder) -> CacheLayerBuilder,
    factory_ms: u64,
) -> (TestRedis, Arc<Instance>) {
    let redis = TestRedis::start().await;
    let a = Arc::new(instance(&redis, tune).await);
    let filling =
        filling_old_until(&a, tokio::time::sleep(Duration::from_millis(factory_ms))).await;
    a.data.remove("product:9").await.unwrap();
    assert_eq!(filling.await.unwrap().unwrap(), product("old"));
    assert_eq!(a.data.get::<Product>("product:9").await.unwrap(), None);
    (redis, a)
}

/// `a` filling `product:9` (kept 60 s) with a factory that answers `old`
/// once `done` completes; returned once the factory has been called.
async fn filling_old_until(
    a: &Arc<Instance>,
    done: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<Result<Product, DataError<String>>> {
    let options = DataOptions::new(Duration::from_secs(60)).near(false);
    filling_old_with(a, options, done).await
}

/// [`filling_old_until`] with `options`.
async fn filling_old_with(
    a: &Arc<Instance>,
    options: DataOptions,
    done: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<Result<Product, DataError<String>>> {
    let (started, factory_started) = tokio::sync::oneshot::channel();
    let filling = tokio::spawn({
        let a = Arc::clone(a);
        async move {
            a.data
                .get_or_insert_with("product:9", &options, move || async move {
                    let _ = started.send(());
                    done.await;
                    Ok::<_, String>(product("old"))
                })
                .await
        }
    });
    tokio::time::timeout(Duration::from_secs(5), factory_started)
        .await
        .expect("the factory was not called")
        .unwrap();
    filling
}

/// A value removed while `a`'s factory runs, then stored by `b` with a TTL
/// shorter than the removal's tombstone lives: `b`'s write must not cut
/// the tombstone's life to its own, or `a`'s value, made before the
/// removal, finds no mark when it comes and is stored.
#[tokio::test]
async fn a_short_lived_value_stored_after_a_removal_keeps_its_tombstone() {
    let redis = TestRedis::start().await;
    let a = Arc::new(instance(&redis, |b| b).await);
    let b = instance(&redis, |b| b).await;
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let filling = filling_old_until(&a, async move {
        let _ = released.await;
    })
    .await;
    a.data.remove("product:9").await.unwrap();
    let short = DataOptions::new(Duration::from_millis(300)).near(false);
    let fresh = b
        .data
        .get_or_insert_with("product:9", &short, || async {
            Ok::<_, String>(product("new"))
        })
        .await
        .unwrap();
    assert_eq!(fresh, product("new"));
    // Past `b`'s value's life in Redis: what it did to the hash's TTL has
    // taken effect when `a`'s value comes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    release.send(()).unwrap();
    assert_eq!(filling.await.unwrap().unwrap(), product("old"));
    assert_ne!(
        a.data.get::<Product>("product:9").await.unwrap(),
        Some(product("old")),
        "the value made before the removal was stored after it"
    );
}

/// A tag purge while the first fill of a value runs, nothing stored yet:
/// the tag's index does not name the value, so the purge leaves a mark in
/// the index, and the fill, which asked before it, finds the mark when it
/// records the value there and removes what it stored (counted as
/// purged). A fill that begins after the purge (its lock granted after
/// the mark) is stored.
#[tokio::test]
async fn a_tag_purge_holds_against_the_first_fill_of_a_value() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let redis = TestRedis::start().await;
    let a = Arc::new(instance(&redis, |b| b).await);
    tag_purged_during_the_first_fill(&a, &recorder).await;
}

/// The same on a Redis Cluster, where the tag's index and the value may
/// be on two nodes: the fill stores, learns of the mark from the index's
/// node, and deletes what it stored.
#[tokio::test]
async fn a_tag_purge_holds_against_the_first_fill_of_a_value_on_a_cluster() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let cluster = tower_redis_core::testing::TestCluster::start().await;
    let a = Arc::new(instance_on(cluster.config(), |b| b, Arc::new(AtomicU64::new(0))).await);
    tag_purged_during_the_first_fill(&a, &recorder).await;
}

/// `product:9` (tagged `product-9`) purged by tag while `a` makes it for
/// the first time; then made again after the purge.
async fn tag_purged_during_the_first_fill(
    a: &Arc<Instance>,
    recorder: &metrics_util::debugging::DebuggingRecorder,
) {
    let options = DataOptions::new(Duration::from_secs(60))
        .near(false)
        .tag("product-9");
    // Answers once the purge has returned.
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let filling = filling_old_with(a, options.clone(), async move {
        let _ = released.await;
    })
    .await;
    a.layer.handle().purge_tag("product-9").await;
    release.send(()).unwrap();
    assert_eq!(filling.await.unwrap().unwrap(), product("old"));
    a.layer.flush().await;
    assert_eq!(
        a.data.get::<Product>("product:9").await.unwrap(),
        None,
        "the value made before the tag purge was stored after it"
    );
    assert_eq!(
        support::dropped_fills(recorder.snapshotter().snapshot()),
        [("data".to_owned(), "purged".to_owned(), 1)]
    );
    a_new_fill_is_stored(a, &options, recorder).await;
}

/// An expired value removed while two factories run for it: `a`'s, which
/// holds the value's fill lock, and `b`'s, which gave up waiting for `a`
/// and runs without the lock. Neither value, made before the removal, is stored
/// after it (`b`'s was: a fill without the lock stored whatever Redis
/// held). And a tag purge while a fill holding the lock runs (it used to
/// delete the lock with the value, and the fill then stored).
#[tokio::test]
async fn a_fill_with_or_without_its_lock_that_began_before_a_removal_does_not_store_after_it() {
    let redis = TestRedis::start().await;
    let a = Arc::new(instance(&redis, |b| b).await);
    let b = Arc::new(instance(&redis, |b| b.coalesce(Some(Duration::from_millis(100)))).await);
    let options = DataOptions::new(Duration::from_secs(60))
        .near(false)
        .tag("product-9");
    let fill = |data: &DataCache, made: &'static str, ms: u64| {
        let (data, options) = (data.clone(), options.clone());
        let (started, factory_started) = tokio::sync::oneshot::channel();
        let filling = tokio::spawn(async move {
            data.get_or_insert_with("product:9", &options, move || async move {
                let _ = started.send(());
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, String>(product(made))
            })
            .await
        });
        (filling, factory_started)
    };
    let called = |started: tokio::sync::oneshot::Receiver<()>| async move {
        tokio::time::timeout(Duration::from_secs(5), started)
            .await
            .expect("the factory was not called")
            .unwrap();
    };
    // Stored first and expired (kept for fail-safe): a tag purge finds the
    // value through its tag's index, which only a stored value is in.
    let expiring = options
        .clone()
        .ttl(Duration::from_millis(100))
        .fail_safe(Duration::from_secs(60));
    for removal in ["remove", "tag purge"] {
        a.data
            .insert("product:9", &product("expired"), &expiring)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (locked, started) = fill(&a.data, "locked", 1500);
        called(started).await;
        let (lockless, started) = fill(&b.data, "lockless", 300);
        called(started).await;
        match removal {
            "remove" => a.data.remove("product:9").await.unwrap(),
            _ => {
                a.layer.handle().purge_tag("product-9").await;
            }
        }
        assert_eq!(lockless.await.unwrap().unwrap(), product("lockless"));
        assert_eq!(locked.await.unwrap().unwrap(), product("locked"));
        a.layer.flush().await;
        b.layer.flush().await;
        assert_eq!(
            a.data.get::<Product>("product:9").await.unwrap(),
            None,
            "{removal}: a value made before it was stored after it"
        );
    }
}

/// Stores `item:0` … `item:{count - 1}` (values `item 0` …), in Redis only.
async fn insert_items(data: &DataCache, count: usize) {
    let far = DataOptions::new(Duration::from_secs(60)).near(false);
    for i in 0..count {
        data.insert(&format!("item:{i}"), &product(&format!("item {i}")), &far)
            .await
            .unwrap();
    }
}

/// Reads that arrive while another is in flight are sent together: twenty
/// reads of twenty values (and one of a value that is not there), started
/// at once, are one `HGET` alone and one pipeline of the other twenty.
/// Each caller gets its own value, the absent one a miss, and Redis still
/// runs one `HGET` per read.
#[tokio::test(flavor = "current_thread")]
async fn reads_arriving_together_are_one_pipeline_and_each_gets_its_own_value() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let redis = TestRedis::start().await;
    let a = instance(&redis, |b| b).await;
    insert_items(&a.data, 20).await;
    let _: Option<Product> = a.data.get("warm-up").await.unwrap();
    // Its bus has subscribed: no SUBSCRIBE among the reads' commands.
    eventually("a subscribed", || async { subscribers(&redis).await == 1 }).await;

    let mut keys: Vec<_> = (0..20).map(|i| format!("item:{i}")).collect();
    keys.push("item:absent".to_owned());
    let (found, commands, timed) = read_at_once(&redis, &recorder, &a.data, &keys).await;
    let mut expected: Vec<_> = (0..20)
        .map(|i| Some(product(&format!("item {i}"))))
        .collect();
    expected.push(None);
    assert_eq!(found, expected);
    assert_eq!(commands, vec!["hget"; 21], "one HGET per read");
    assert_eq!(
        (timed.get("HGET"), timed.get("PIPELINE")),
        (Some(&1), Some(&1)),
        "the first read alone, the others in one pipeline: {timed:?}"
    );
}

/// Values larger than 8 KiB are read alone: twenty reads of twenty 16 KiB
/// values, started at once, are twenty `HGET`s each timed on its own and no
/// pipeline, whether the instance learnt their size when it stored them
/// (`a`) or when it read them (`b`).
#[tokio::test(flavor = "current_thread")]
async fn reads_of_large_values_are_not_gathered() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let redis = TestRedis::start().await;
    let a = instance(&redis, |b| b).await;
    let b = instance(&redis, |b| b).await;
    let large = |i: usize| product(&format!("item {i} {}", "x".repeat(16 * 1024)));
    let far = DataOptions::new(Duration::from_secs(60)).near(false);
    let keys: Vec<_> = (0..20).map(|i| format!("big:{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        a.data.insert(key, &large(i), &far).await.unwrap();
    }
    for (i, key) in keys.iter().enumerate() {
        let value: Option<Product> = b.data.get(key).await.unwrap();
        assert_eq!(value, Some(large(i)));
    }
    // Starts `a`'s bus (its first read subscribes), outside the window.
    let _: Option<Product> = a.data.get("warm-up").await.unwrap();
    eventually("both subscribed", || async {
        subscribers(&redis).await == 2
    })
    .await;
    for (name, reader) in [("a", &a), ("b", &b)] {
        let (found, commands, timed) = read_at_once(&redis, &recorder, &reader.data, &keys).await;
        let expected: Vec<_> = (0..20).map(|i| Some(large(i))).collect();
        assert_eq!(found, expected, "{name}");
        assert_eq!(commands, vec!["hget"; 20], "{name}: one HGET per read");
        assert_eq!(
            (timed.get("HGET"), timed.get("PIPELINE").unwrap_or(&0)),
            (Some(&20), &0),
            "{name}: every read alone: {timed:?}"
        );
    }
}

/// Reads `keys` through `data`, all started at once: what each found, the
/// commands Redis ran meanwhile, and the operations timed (by name, from
/// `recorder`, the thread's recorder).
async fn read_at_once(
    redis: &TestRedis,
    recorder: &metrics_util::debugging::DebuggingRecorder,
    data: &DataCache,
    keys: &[String],
) -> (
    Vec<Option<Product>>,
    Vec<String>,
    std::collections::HashMap<String, usize>,
) {
    let snapshotter = recorder.snapshotter();
    // A snapshot takes the histograms' samples: the next one holds the
    // reads' alone.
    let _ = snapshotter.snapshot();
    let reads = keys.iter().map(|key| {
        let data = data.clone();
        async move { data.get::<Product>(key).await.unwrap() }
    });
    let (found, commands) = redis
        .commands_during(within("the reads", futures_util::future::join_all(reads)))
        .await;
    (found, commands, operations(snapshotter.snapshot()))
}

/// Reads started at once from many tasks on a multi-threaded runtime,
/// where batches form and are answered on both workers at the same time:
/// each caller gets its own value (an absent key a miss), whichever batch
/// it went in, or none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_on_several_threads_at_once_each_get_their_own_value() {
    let redis = TestRedis::start().await;
    let a = instance(&redis, |b| b).await;
    insert_items(&a.data, 50).await;
    let reads = (0..2_000).map(|n| {
        let data = a.data.clone();
        tokio::spawn(async move {
            let i = n % 51;
            let key = if i < 50 {
                format!("item:{i}")
            } else {
                "item:absent".to_owned()
            };
            (i, data.get::<Product>(&key).await.unwrap())
        })
    });
    let found = within("the reads", futures_util::future::join_all(reads)).await;
    for read in found {
        let (i, value) = read.expect("no read panics");
        let expected = (i < 50).then(|| product(&format!("item {i}")));
        assert_eq!(value, expected, "the read of item {i}");
    }
}

/// When the call of gathered reads fails (Redis stops answering), every
/// read in it falls back to the in-process store (a miss there), none
/// fails, and the breaker counts two failed calls (the first read's own
/// and the pipeline of the nineteen others), not twenty.
#[tokio::test(flavor = "current_thread")]
async fn gathered_reads_fall_back_together_when_redis_stops_answering() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(
        redis
            .config()
            .failure_threshold(100)
            .command_timeout(Duration::from_millis(300))
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let data = DataCache::new(manager.clone());
    let _: Option<Product> = data.get("warm-up").await.unwrap();
    redis.pause().await;
    let reads = (0..20).map(|i| {
        let data = data.clone();
        async move { data.get::<Product>(&format!("item:{i}")).await }
    });
    let values = within("the reads", futures_util::future::join_all(reads)).await;
    let failures = manager.health().consecutive_failures;
    redis.resume().await;
    for value in values {
        assert_eq!(value.unwrap(), None, "nothing in process yet");
    }
    assert_eq!(failures, 2, "the reads' calls that failed");
    let misses: u64 = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| {
            let key = key.key();
            let labelled = |name: &str, wanted: &str| {
                key.labels()
                    .any(|label| label.key() == name && label.value() == wanted)
            };
            match value {
                metrics_util::debugging::DebugValue::Counter(n)
                    if key.name() == "tower_redis_cache_data_total"
                        && labelled("result", "miss")
                        && labelled("tier", "in-process") =>
                {
                    Some(n)
                }
                _ => None,
            }
        })
        .sum();
    assert_eq!(misses, 20, "every read fell back to the in-process store");
}

/// A read that leads gathered reads and whose caller goes away (its
/// request was cancelled) while their pipeline waits for a hung Redis:
/// the pipeline's call goes on, and the others are answered from it (they
/// fall back when it times out). They do not read again, each on its own,
/// which would make them wait for the hung Redis a second time: the
/// breaker counts two failed calls (the first read's and the pipeline's),
/// where reading again made it eight.
#[tokio::test(flavor = "current_thread")]
async fn gathered_reads_whose_leader_is_cancelled_are_answered_by_its_call() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let redis = TestRedis::start().await;
    let manager = hanging_manager(&redis, TIMEOUT).await;
    let data = DataCache::new(manager.clone());
    let _: Option<Product> = data.get("warm-up").await.unwrap();
    redis.pause().await;
    let read = |i: usize| {
        let data = data.clone();
        tokio::spawn(async move { data.get::<Product>(&format!("item:{i}")).await })
    };
    // The first goes alone; the next leads a batch, which the others join
    // (this runtime runs the tasks in turn: each reaches Redis, or its
    // batch, before the next starts).
    let alone = read(0);
    tokio::task::yield_now().await;
    let leader = read(1);
    let others: Vec<_> = (2..9).map(read).collect();
    // The pipeline is sent (Redis does not answer): halfway through its
    // timeout, its leader goes.
    tokio::time::sleep(TIMEOUT / 2).await;
    leader.abort();
    let started = std::time::Instant::now();
    for other in others {
        let value = within("a gathered read", other).await.expect("no panic");
        assert_eq!(value.unwrap(), None, "fell back: nothing in process");
    }
    let waited = started.elapsed();
    let failures = manager.health().consecutive_failures;
    assert_eq!(
        within("the first read", alone).await.unwrap().unwrap(),
        None
    );
    redis.resume().await;
    assert_eq!(
        failures, 2,
        "the calls that failed: the first read's and the pipeline's (its leader cancelled)"
    );
    // Reading again would have waited a whole timeout from here.
    assert!(
        waited < TIMEOUT * 3 / 4,
        "answered when the pipeline timed out, {waited:?} after the leader went"
    );
}

/// On a Redis Cluster a pipeline cannot span slots: reads there are not
/// gathered, each goes alone to its slot's node (timed as its own `HGET`),
/// and each caller gets its own value.
#[tokio::test(flavor = "current_thread")]
async fn reads_on_a_redis_cluster_go_alone_each_to_its_own_slot() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let cluster = tower_redis_core::testing::TestCluster::start().await;
    let manager = RedisManager::connect(cluster.config().build().unwrap())
        .await
        .unwrap();
    let data = DataCache::new(manager);
    let far = DataOptions::new(Duration::from_secs(60)).near(false);
    for i in 0..20 {
        data.insert(&format!("item:{i}"), &product(&format!("item {i}")), &far)
            .await
            .unwrap();
    }
    let _ = snapshotter.snapshot();
    let reads = (0..20).map(|i| {
        let data = data.clone();
        async move { data.get::<Product>(&format!("item:{i}")).await.unwrap() }
    });
    let found = within("the reads", futures_util::future::join_all(reads)).await;
    let expected: Vec<_> = (0..20)
        .map(|i| Some(product(&format!("item {i}"))))
        .collect();
    assert_eq!(found, expected);
    let timed = operations(snapshotter.snapshot());
    assert_eq!(
        (timed.get("HGET"), timed.get("PIPELINE")),
        (Some(&20), None),
        "each read alone: {timed:?}"
    );
    let mut served = 0;
    for node in 0..cluster.len() {
        served += cluster
            .command_calls(node)
            .await
            .get("hget")
            .copied()
            .unwrap_or(0);
    }
    assert_eq!(served, 20, "one HGET per read, on the nodes of their slots");
}

/// An error reply that says Redis is unhealthy (`MASTERDOWN`: a replica
/// that lost its primary and serves no stale data) counts against the
/// breaker, for a read alone and for reads gathered into one pipeline: it
/// is not taken as an answer. Each read falls back to the in-process
/// store.
#[tokio::test(flavor = "current_thread")]
async fn an_unhealthy_reply_counts_against_the_breaker_alone_or_gathered() {
    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().failure_threshold(1000).build().unwrap())
        .await
        .unwrap();
    let data = DataCache::new(manager.clone());
    let _: Option<Product> = data.get("warm-up").await.unwrap();
    redis
        .config_set("replica-serve-stale-data", "no")
        .await
        .unwrap();
    let mut admin = redis.connection().await.unwrap();
    // A primary that does not exist: the link stays down.
    let unused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(unused)
        .query_async(&mut admin)
        .await
        .unwrap();

    assert_eq!(data.get::<Product>("item:alone").await.unwrap(), None);
    assert_eq!(manager.health().consecutive_failures, 1, "the read alone");
    let reads = (0..20).map(|i| {
        let data = data.clone();
        async move { data.get::<Product>(&format!("item:{i}")).await }
    });
    for value in within("the reads", futures_util::future::join_all(reads)).await {
        assert_eq!(value.unwrap(), None);
    }
    assert_eq!(
        manager.health().consecutive_failures,
        3,
        "the first read's own call and the pipeline of the others"
    );
    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async(&mut admin)
        .await
        .unwrap();
}

/// A read that Redis answered before this instance's own write, and whose
/// answer arrives after the write was acknowledged, keeps no near copy:
/// the next read on this instance sees the write. (Redis reports the write
/// on the tracking connection, but that word comes after the read's
/// answer; here the tracking connection's network is 50 ms slow.)
#[tokio::test]
async fn a_read_answered_before_this_instance_s_write_keeps_no_copy_of_the_old_value() {
    let redis = TestRedis::start().await;
    let a = slow_tracking_instance(&redis).await;
    let options = DataOptions::new(Duration::from_secs(60));
    a.data
        .insert("product:7", &product("v0"), &options)
        .await
        .unwrap();
    let _: Option<Product> = a.data.get("product:7").await.unwrap();
    wait_for_tracking(&a.manager, DEADLINE).await;
    // Rounds where the read did see the old value (on a busy machine it
    // may be sent only after the write, and read the new one).
    let mut raced = 0;
    for round in 1..=20 {
        if raced == 3 {
            break;
        }
        let old = product(&format!("v{round}"));
        let new = product(&format!("v{round}-new"));
        // Settled: no near copy, no word from Redis still on its way.
        a.data.insert("product:7", &old, &options).await.unwrap();
        let tracking = a.manager.tracking().expect("tracking");
        tracking.sync().await.unwrap();
        let reading = tokio::spawn({
            let data = a.data.clone();
            async move { data.get::<Product>("product:7").await.unwrap() }
        });
        // Redis answers the read at once; the answer is 50 ms on its way
        // when the write is acknowledged.
        tokio::time::sleep(Duration::from_millis(20)).await;
        a.data.insert("product:7", &new, &options).await.unwrap();
        let read = within("the read", reading).await.unwrap();
        raced += u32::from(read == Some(old));
        let after: Option<Product> = a.data.get("product:7").await.unwrap();
        assert_eq!(
            after,
            Some(new),
            "round {round}: read on the writing instance after its write"
        );
    }
    assert_eq!(raced, 3, "reads answered before the write, in 20 rounds");
}

/// A purge of more URLs than the purging instance notes one by one (4,096)
/// empties its near tier: the near copy of a purged value the purge did not
/// note is not served after the purge returns, though Redis' invalidation
/// reaches this instance 50 ms later (its tracking connection is slow).
#[tokio::test]
async fn a_purge_of_more_urls_than_it_notes_empties_the_near_tier() {
    const VALUES: usize = 4_097;
    let redis = TestRedis::start().await;
    let a = slow_tracking_instance(&redis).await;
    let _: Option<Product> = a.data.get("warm-up").await.unwrap();
    wait_for_tracking(&a.manager, DEADLINE).await;
    let options = DataOptions::new(Duration::from_secs(3600)).tag("bulk");
    // By 16 tasks; the last value alone after them, so that the index
    // lists it last, past the bound.
    let last = format!("bulk:{}", VALUES - 1);
    let tasks: Vec<_> = (0..16)
        .map(|task| {
            let (data, options) = (a.data.clone(), options.clone());
            tokio::spawn(async move {
                for n in (task..VALUES - 1).step_by(16) {
                    let value = product(&format!("v{n}"));
                    data.insert(&format!("bulk:{n}"), &value, &options)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        within("the inserts", task).await.unwrap();
    }
    // A later expiry than every other (the index's order), not a tie.
    tokio::time::sleep(Duration::from_millis(5)).await;
    a.data
        .insert(&last, &product("last"), &options)
        .await
        .unwrap();
    let near_hit = tokio::time::timeout(DEADLINE, async {
        loop {
            let (value, commands) = redis.commands_during(a.data.get::<Product>(&last)).await;
            if value.unwrap().is_some() && commands.is_empty() {
                return;
            }
        }
    });
    near_hit
        .await
        .expect("a near copy of the last value within 10 s");
    let purged = a.data.purge_tag("bulk").await;
    assert_eq!(purged.urls, VALUES as u64);
    assert_eq!(
        a.data.get::<Product>(&last).await.unwrap(),
        None,
        "the purged value's near copy was served after the purge"
    );
}

/// A data cache whose manager waits `timeout` for each command and keeps
/// its breaker closed (50 failures): while Redis hangs, each call sent is
/// one more wait.
async fn hanging_data(redis: &TestRedis, timeout: Duration) -> DataCache {
    DataCache::new(hanging_manager(redis, timeout).await)
}

/// The manager of [`hanging_data`].
async fn hanging_manager(redis: &TestRedis, timeout: Duration) -> RedisManager {
    let config = redis
        .config()
        .failure_threshold(50)
        .command_timeout(timeout);
    RedisManager::connect(config.build().unwrap())
        .await
        .unwrap()
}

/// While Redis hangs and the breaker has not opened yet, a miss of
/// `get_or_insert_with` whose read timed out waits for Redis one command
/// timeout, not three: it asks Redis for no fill lock, and its value is
/// returned before it is stored (that write times out in the background).
/// So does a call that follows another's fill of the same key in this
/// process: the fill tells it the value before the write, as it tells its
/// own caller.
#[tokio::test]
async fn while_redis_hangs_a_miss_waits_for_it_one_command_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let redis = TestRedis::start().await;
    let data = hanging_data(&redis, TIMEOUT).await;
    let calls = Arc::new(AtomicU64::new(0));
    let options = DataOptions::default();
    // Redis knows the scripts (a miss took a lock and stored).
    let _ = data
        .get_or_insert_with("warm-up", &options, counted(&calls, "w", Duration::ZERO))
        .await
        .unwrap();
    redis.pause().await;
    let started = Instant::now();
    let value = within(
        "the miss",
        data.get_or_insert_with("item:1", &options, counted(&calls, "a", Duration::ZERO)),
    )
    .await;
    let waited = started.elapsed();
    assert_eq!(value.unwrap(), product("a"));
    assert!(
        waited < TIMEOUT * 3 / 2,
        "the miss waited {waited:?} for a {TIMEOUT:?} command timeout"
    );
    // Two calls at once for a key not stored, whose factory takes 200 ms:
    // one fills, the other follows its flight.
    let timed = async |name: &'static str| {
        let started = Instant::now();
        let value = within(
            "a call for item:2",
            data.get_or_insert_with(
                "item:2",
                &options,
                counted(&calls, name, Duration::from_millis(200)),
            ),
        )
        .await;
        (value, started.elapsed())
    };
    let before = calls.load(Ordering::SeqCst);
    let (first, second) = tokio::join!(timed("b"), timed("c"));
    redis.resume().await;
    assert_eq!(
        calls.load(Ordering::SeqCst) - before,
        1,
        "one factory call for both"
    );
    for (value, waited) in [first, second] {
        let value = value.unwrap();
        assert!(value == product("b") || value == product("c"), "{value:?}");
        assert!(
            waited < TIMEOUT + Duration::from_millis(700),
            "a call for item:2 waited {waited:?} for a {TIMEOUT:?} command timeout"
        );
    }
}

/// While Redis hangs, a fill whose factory fails tells the calls following
/// it in this process at once, before it writes the expired value back
/// (the fail-safe throttle): each serves its expired value after one
/// command timeout, not two.
#[tokio::test]
async fn while_redis_hangs_a_failed_fill_hands_its_followers_their_expired_value_at_once() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let redis = TestRedis::start().await;
    let data = hanging_data(&redis, TIMEOUT).await;
    let calls = Arc::new(AtomicU64::new(0));
    let options = DataOptions::new(Duration::from_millis(100)).fail_safe(Duration::from_secs(60));
    redis.pause().await;
    // Stored in process (its write times out): expired 100 ms later.
    let first = within(
        "the first call",
        data.get_or_insert_with("item:5", &options, counted(&calls, "a", Duration::ZERO)),
    )
    .await;
    assert_eq!(first.unwrap(), product("a"));
    tokio::time::sleep(TIMEOUT * 3 / 2).await;
    // Two at once: one fills, its factory failing after 200 ms; the other
    // follows it.
    let failing_slowly = || {
        let calls = Arc::clone(&calls);
        move || -> std::pin::Pin<Box<dyn Future<Output = Result<Product, String>> + Send>> {
            Box::pin(async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                Err("the database is down".to_owned())
            })
        }
    };
    let timed = async |factory| {
        let started = Instant::now();
        let value = within(
            "a call for item:5",
            data.get_or_insert_with("item:5", &options, factory),
        )
        .await;
        (value, started.elapsed())
    };
    let before = calls.load(Ordering::SeqCst);
    let (one, other) = tokio::join!(timed(failing_slowly()), timed(failing_slowly()));
    redis.resume().await;
    assert_eq!(calls.load(Ordering::SeqCst) - before, 1, "one factory call");
    for (value, waited) in [one, other] {
        assert_eq!(
            value.unwrap(),
            product("a"),
            "the expired value (fail-safe)"
        );
        assert!(
            waited < TIMEOUT + Duration::from_millis(700),
            "a call for item:5 waited {waited:?} for a {TIMEOUT:?} command timeout"
        );
    }
}

/// A call waiting for another instance's fill (its lock held), that finds
/// Redis hung when it reads again, runs its own factory after that one
/// timeout and returns the value before it is stored: it waited for the
/// write too before, a second command timeout. So does a miss whose lock
/// attempt timed out.
#[tokio::test]
async fn a_call_waiting_for_another_instance_s_fill_stops_asking_redis_once_it_hangs() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let redis = TestRedis::start().await;
    let (a, b) = (
        hanging_data(&redis, TIMEOUT).await,
        hanging_data(&redis, TIMEOUT).await,
    );
    let calls = Arc::new(AtomicU64::new(0));
    let options = DataOptions::default();
    // Redis knows the scripts (a miss took a lock and stored).
    let _ = a
        .get_or_insert_with("warm-up", &options, counted(&calls, "w", Duration::ZERO))
        .await
        .unwrap();
    // B fills `item:3`, holding its lock while its factory runs (3 s).
    let filling = tokio::spawn({
        let (b, options, calls) = (b.clone(), options.clone(), Arc::clone(&calls));
        async move {
            b.get_or_insert_with(
                "item:3",
                &options,
                counted(&calls, "b", Duration::from_secs(3)),
            )
            .await
        }
    });
    eventually("B's factory runs", || {
        let calls = Arc::clone(&calls);
        async move { calls.load(Ordering::SeqCst) == 2 }
    })
    .await;
    // A finds the lock held, and waits for B's value, reading again now
    // and then (every 250 ms at most).
    let waiting = tokio::spawn({
        let (a, options, calls) = (a.clone(), options.clone(), Arc::clone(&calls));
        async move {
            a.get_or_insert_with("item:3", &options, counted(&calls, "a", Duration::ZERO))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    redis.pause().await;
    let paused = Instant::now();
    let value = within("A's call", waiting).await.expect("task");
    let waited = paused.elapsed();
    redis.resume().await;
    assert_eq!(value.unwrap(), product("a"));
    // One timeout (of the read or lock attempt under way, or of the next,
    // within 250 ms), then its own factory; not a second timeout.
    assert!(
        waited < TIMEOUT + Duration::from_millis(700),
        "A waited {waited:?} after Redis hung, for a {TIMEOUT:?} command timeout"
    );
    let _ = within("B's fill", filling).await;
    // Written: what A queued while Redis hung (its lock attempts' releases).
    let _ = a
        .get_or_insert_with("warm-up", &options, counted(&calls, "w", Duration::ZERO))
        .await
        .unwrap();

    // Redis hangs on writes only: A's read is answered, and its lock
    // attempt (a script) times out. Its value is returned before the write.
    redis.pause_writes().await;
    let started = Instant::now();
    let value = within(
        "a miss whose lock attempt times out",
        a.get_or_insert_with("item:4", &options, counted(&calls, "d", Duration::ZERO)),
    )
    .await;
    let waited = started.elapsed();
    redis.resume_writes().await;
    assert_eq!(value.unwrap(), product("d"));
    assert!(
        waited < TIMEOUT * 3 / 2,
        "a miss whose lock attempt timed out waited {waited:?}, for a {TIMEOUT:?} command timeout"
    );
}
