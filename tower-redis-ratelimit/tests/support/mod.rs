//! Helpers shared by the rate-limit crate's integration suites: the app
//! behind the layer and a manager on a test Redis.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Empty;
use tower_redis_core::testing::TestRedis;
use tower_redis_core::{RedisManager, redis};
use tower_redis_ratelimit::RateLimitLayer;

/// The layer around [`app`]'s inner service, boxed.
pub(crate) type Svc = tower::util::BoxCloneSyncService<
    Request<()>,
    Response<tower_redis_ratelimit::ResponseBody<Empty<Bytes>>>,
    Infallible,
>;

/// The app behind the layer: 200, empty body.
pub(crate) fn app(layer: RateLimitLayer) -> Svc {
    let inner = tower::service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
    });
    tower::util::BoxCloneSyncService::new(tower::Layer::layer(&layer, inner))
}

/// A manager on `redis` with the test configuration.
pub(crate) async fn manager(redis: &TestRedis) -> RedisManager {
    RedisManager::connect(redis.config().build().expect("valid"))
        .await
        .expect("starts")
}

/// A command timeout far above any decision's cost, for tests whose subject
/// is exactness while Redis answers: on a loaded machine the default (low
/// hundreds of ms) can expire and send a batch to the local limiter.
#[allow(dead_code)] // not every suite that includes this module uses it
pub(crate) const PATIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// A manager on `redis` with [`PATIENT_TIMEOUT`] as its command timeout.
#[allow(dead_code)] // not every suite that includes this module uses it
pub(crate) async fn patient_manager(redis: &TestRedis) -> RedisManager {
    RedisManager::connect(
        redis
            .config()
            .command_timeout(PATIENT_TIMEOUT)
            .build()
            .expect("valid"),
    )
    .await
    .expect("starts")
}

/// True when the `RateLimit` field says the answer was decided without
/// Redis (`…;local`).
#[allow(dead_code)] // not every suite that includes this module uses it
pub(crate) fn decided_locally<B>(response: &Response<B>) -> bool {
    response
        .headers()
        .get("ratelimit")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(";local"))
}

/// Sleeps past a window edge when one is near, so window tests never straddle it.
pub(crate) async fn away_from_window_edge(redis: &TestRedis, window: Duration) {
    let mut conn = redis.connection().await.expect("connection");
    let (secs, micros): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut conn)
        .await
        .expect("TIME");
    let now = Duration::from_secs(secs) + Duration::from_micros(micros);
    let into = Duration::from_nanos((now.as_nanos() % window.as_nanos()) as u64);
    if window - into < Duration::from_secs(20) {
        tokio::time::sleep(window - into + Duration::from_millis(50)).await;
    }
}

/// The key of the one counter whose name contains `part`.
#[allow(dead_code)] // not every suite that includes this module uses it
pub(crate) async fn the_key(conn: &mut redis::aio::MultiplexedConnection, part: &str) -> String {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{part}*"))
        .query_async(conn)
        .await
        .expect("KEYS");
    assert_eq!(keys.len(), 1, "{keys:?}");
    keys.into_iter().next().expect("one key")
}

/// Puts a hash where the counter `key` is: a key of another type (the
/// layout of window counters in earlier versions).
#[allow(dead_code)]
pub(crate) async fn replace_with_a_hash(conn: &mut redis::aio::MultiplexedConnection, key: &str) {
    let () = redis::cmd("DEL")
        .arg(key)
        .query_async(conn)
        .await
        .expect("DEL");
    let () = redis::cmd("HSET")
        .arg(key)
        .arg("w")
        .arg(1)
        .arg("c")
        .arg(5)
        .query_async(conn)
        .await
        .expect("HSET");
}

/// Redis's `TYPE` of `key`.
#[allow(dead_code)]
pub(crate) async fn key_type(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> String {
    redis::cmd("TYPE")
        .arg(key)
        .query_async(conn)
        .await
        .expect("TYPE")
}
