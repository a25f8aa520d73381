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
