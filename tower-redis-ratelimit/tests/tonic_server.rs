//! The layer on a real tonic server: an exceeded limit reaches the gRPC
//! client as RESOURCE_EXHAUSTED, not as an HTTP error.

use std::time::Duration;

use tonic::Code;
use tonic::transport::{Channel, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower_redis_core::RedisManager;
use tower_redis_core::testing::TestRedis;
use tower_redis_ratelimit::{Key, Policy, RateLimitLayer};

#[tokio::test]
async fn an_exceeded_grpc_limit_is_resource_exhausted() {
    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().expect("valid"))
        .await
        .expect("starts");
    let limits = RateLimitLayer::builder(manager)
        .policy(Policy::gcra("per-key", 2, Duration::from_secs(3600)).key(Key::header("x-api-key")))
        .build()
        .expect("layer");
    let (_reporter, health) = tonic_health::server::health_reporter();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        Server::builder()
            .layer(limits)
            .add_service(health)
            .serve_with_incoming(tokio_stream_from(listener))
            .await
            .expect("serve");
    });

    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut client = HealthClient::new(channel);
    let call = || {
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        request
            .metadata_mut()
            .insert("x-api-key", "team-a".parse().expect("metadata"));
        request
    };
    assert!(client.check(call()).await.is_ok());
    assert!(client.check(call()).await.is_ok());
    let status = client
        .check(call())
        .await
        .expect_err("third call is over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("per-key"), "{}", status.message());
}

/// Accepted connections as the stream tonic's `serve_with_incoming` takes.
fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl tonic::codegen::tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tonic::codegen::tokio_stream::wrappers::TcpListenerStream::new(listener)
}
