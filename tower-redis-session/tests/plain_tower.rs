//! Without axum: the session is a request extension of any tower service.

use std::convert::Infallible;

use http::{Request, Response, header};
use tower::ServiceExt;
use tower_redis_core::RedisManager;
use tower_redis_core::testing::TestRedis;
use tower_redis_session::{Session, SessionLayer};

#[tokio::test]
async fn the_session_is_a_request_extension() {
    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().unwrap())
        .await
        .unwrap();
    let layer = SessionLayer::builder(manager)
        .insecure_http_for_local_development()
        .build()
        .unwrap();
    let service = tower::Layer::layer(
        &layer,
        tower::service_fn(|request: Request<()>| async move {
            let session = request
                .extensions()
                .get::<Session>()
                .expect("the layer adds it")
                .clone();
            let visits: u32 = session.get("visits").await.unwrap().unwrap_or(0) + 1;
            session.insert("visits", visits).await.unwrap();
            Ok::<_, Infallible>(Response::new(visits.to_string()))
        }),
    );

    let first = service.clone().oneshot(Request::new(())).await.unwrap();
    let set_cookie = first.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_owned();
    // The development opt-in: no Secure, so no __Host- prefix.
    assert!(set_cookie.starts_with("session="), "{set_cookie}");
    assert!(!set_cookie.contains("Secure"), "{set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let mut last = String::new();
    for _ in 0..3 {
        let request = Request::builder()
            .header(header::COOKIE, &cookie)
            .body(())
            .unwrap();
        last = service.clone().oneshot(request).await.unwrap().into_body();
    }
    assert_eq!(last, "4");
}
