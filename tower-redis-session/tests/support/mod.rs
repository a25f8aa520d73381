//! Helpers shared by the session crate's integration suites: gates that
//! hold a handler where a test says, requests with a cookie read whole,
//! and waits that end in a deadline.
//!
//! Each suite uses a part of this module; the rest is dead code there.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Path;
use axum::{Extension, Router};
use http::{Request, Response, header};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_redis_core::redis;
use tower_redis_core::testing::TestRedis;
use tower_redis_session::Session;

/// Points where a test holds a handler, so that requests overlap exactly
/// as the test says instead of by timing.
pub(crate) struct Gates {
    /// Two `/paired-set` requests both load before either writes.
    pub(crate) pair: tokio::sync::Barrier,
    /// A `/gated-*` handler has loaded the session…
    pub(crate) loaded: tokio::sync::Notify,
    /// …and goes on when the test says so.
    pub(crate) proceed: tokio::sync::Notify,
}

impl Gates {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            pair: tokio::sync::Barrier::new(2),
            loaded: tokio::sync::Notify::new(),
            proceed: tokio::sync::Notify::new(),
        })
    }

    /// Tells the test the session is loaded, then waits for its go.
    pub(crate) async fn hold(&self) {
        self.loaded.notify_one();
        self.proceed.notified().await;
    }
}

/// `future`, or a failure naming `what` after 10 s.
pub(crate) async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .unwrap_or_else(|_| panic!("{what} took over 10 s"))
}

/// Sends a request with an optional cookie; returns (status, body, Set-Cookie value).
pub(crate) async fn send(
    app: &Router,
    method: &str,
    path: &str,
    cookie: Option<&str>,
) -> (u16, String, Option<String>, Response<()>) {
    send_bytes(app, method, path, cookie.map(str::as_bytes)).await
}

/// [`send`] with a `Cookie` line of any bytes a header value may hold.
pub(crate) async fn send_bytes(
    app: &Router,
    method: &str,
    path: &str,
    cookie: Option<&[u8]>,
) -> (u16, String, Option<String>, Response<()>) {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(cookie) = cookie {
        let value = http::HeaderValue::from_bytes(cookie).expect("a header value");
        request = request.header(header::COOKIE, value);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    let set_cookie = response
        .headers()
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (parts, body) = response.into_parts();
    let body =
        String::from_utf8(body.collect().await.expect("body").to_bytes().to_vec()).expect("utf-8");
    (
        parts.status.as_u16(),
        body,
        set_cookie,
        Response::from_parts(parts, ()),
    )
}

/// `name=value` of a Set-Cookie, to send back as a Cookie header.
pub(crate) fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().expect("pair").to_owned()
}

pub(crate) async fn session_keys(redis: &TestRedis) -> Vec<String> {
    let mut conn = redis.connection().await.expect("connection");
    redis::cmd("KEYS")
        .arg("*:s")
        .query_async(&mut conn)
        .await
        .expect("KEYS")
}

/// `GET /get/{key}`: the entry as a string, or `none`.
pub(crate) async fn get_entry(session: Session, Path(key): Path<String>) -> String {
    session
        .get::<String>(&key)
        .await
        .expect("json")
        .unwrap_or_else(|| "none".to_owned())
}

/// `POST /gated-set/{key}/{value}`: loads the entry, waits at the gates,
/// then sets it.
pub(crate) async fn gated_set(
    session: Session,
    Extension(gates): Extension<Arc<Gates>>,
    Path((key, value)): Path<(String, String)>,
) -> &'static str {
    let _ = session.get::<String>(&key).await;
    gates.hold().await;
    session.insert(&key, value).await.expect("json");
    "set"
}

/// `POST /login/{user}`: a new id, the user, and a `user` entry.
pub(crate) async fn login(session: Session, Path(user): Path<String>) -> &'static str {
    session.cycle_id().await;
    session.set_user(&user).await;
    session.insert("user", user).await.expect("json");
    "welcome"
}

/// `POST /logout`: the session ends.
pub(crate) async fn logout(session: Session) -> &'static str {
    session.destroy().await;
    "bye"
}
