//! Bugs found in `tower-redis-cache` by the chaos and bad-input work, each
//! a test that failed until the cache was fixed and now guards against the
//! bug's return (the cache crate was being changed by someone else when
//! they were found, so they were not fixed here). See the issue 9 report.

#![allow(clippy::unwrap_used)]

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_redis_cache::CacheLayer;
use tower_redis_core::testing::TestRedis;
use tower_redis_core::{RedisManager, redis};

/// A stored entry whose age field is absurd (a foreign writer, a corrupted
/// value, a future format) must be a miss, as the entry format promises for
/// values that do not make sense, not a panic.
///
/// `Entry::age` computes `initial_age + elapsed` (seconds since the stored
/// response time) with a plain `+`
/// (tower-redis-cache/src/entry.rs): with `initial_age` near `u64::MAX`
/// that overflows, which panics in debug builds (and wraps in release,
/// turning an ancient entry into a fresh one). The decoder accepts any u64
/// there. A saturating add, or a decoder that rejects ages and lifetimes
/// above `MAX_DELTA`, fixes it.
#[tokio::test]
async fn a_stored_entry_with_an_absurd_age_is_a_miss_not_a_panic() {
    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().key_prefix("bug").build().unwrap())
        .await
        .unwrap();
    let cache = CacheLayer::builder(manager).build().unwrap();
    let app = Router::new()
        .route(
            "/p",
            get(|| async { ([(header::CACHE_CONTROL, "public, max-age=60")], "page") }),
        )
        .layer(cache.clone());
    let get = || {
        Request::get("/p")
            .header(header::HOST, "shop.test")
            .body(Body::empty())
            .unwrap()
    };
    // Read in full: an entry is stored once its body has been sent.
    let first = app.clone().oneshot(get()).await.unwrap();
    first.into_body().collect().await.unwrap();
    cache.flush().await;

    // Overwrite the stored entry's response time (bytes 6..14 of the
    // format: magic, version, status, then the response time in ms) with 0,
    // and its initial age (bytes 14..22) with u64::MAX.
    let mut conn = redis.connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("bug:c:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "one URL stored");
    let fields: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    let (field, mut entry) = fields
        .into_iter()
        .find(|(f, _)| f.starts_with("e:"))
        .expect("a stored variant");
    assert_eq!(&entry[..3], b"TRC");
    entry[6..14].copy_from_slice(&0u64.to_be_bytes());
    entry[14..22].copy_from_slice(&u64::MAX.to_be_bytes());
    redis::cmd("HSET")
        .arg(&keys[0])
        .arg(&field)
        .arg(entry)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();

    let answered = tokio::spawn(async move {
        let response = app.oneshot(get()).await.unwrap();
        let status = response.status();
        let cache_status = response.headers().get("cache-status").cloned();
        let age = response.headers().get(header::AGE).cloned();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, cache_status, age, body)
    })
    .await;
    let (status, cache_status, age, body) =
        answered.expect("the cache does not panic on a stored value");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"page");
    // A miss: forwarded to the origin for want of a usable entry, not
    // served from the stored one (a hit answers 200 with the same body).
    let cache_status = cache_status
        .expect("the cache says what it did")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        cache_status.starts_with("tower-redis; fwd=")
            && cache_status.contains("miss")
            && !cache_status.contains("hit"),
        "the absurd entry is a miss: {cache_status}"
    );
    assert_eq!(age, None, "a response from the origin has no Age");
}
