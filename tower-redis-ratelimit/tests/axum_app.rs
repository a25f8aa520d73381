//! The layer in a real axum server: `Router::layer`, client IPs from
//! `ConnectInfo`, responses over the wire.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_redis_core::RedisManager;
use tower_redis_core::testing::TestRedis;
use tower_redis_ratelimit::{Policy, RateLimitLayer};

/// One HTTP/1.1 request on a fresh connection; returns the raw response.
async fn get_raw(addr: SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nX-Forwarded-For: 9.9.9.9\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
}

#[tokio::test]
async fn axum_router_with_connect_info_is_limited_per_client_ip() {
    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().expect("valid"))
        .await
        .expect("starts");
    let limits = RateLimitLayer::builder(manager)
        .policy(Policy::gcra("per-ip", 2, Duration::from_secs(3600)))
        .build()
        .expect("layer");
    let app = Router::new()
        .route("/hello", get(|| async { "hello" }))
        .layer(limits);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .expect("serve");
    });

    let first = get_raw(addr, "/hello").await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(
        first
            .to_ascii_lowercase()
            .contains("ratelimit: \"per-ip\";r=1;"),
        "{first}"
    );
    assert!(first.ends_with("hello"), "{first}");
    assert!(get_raw(addr, "/hello").await.starts_with("HTTP/1.1 200"));
    let third = get_raw(addr, "/hello").await;
    assert!(third.starts_with("HTTP/1.1 429"), "{third}");
    assert!(
        third.to_ascii_lowercase().contains("retry-after: "),
        "{third}"
    );
    assert!(third.contains("quota-exceeded"), "{third}");
}
