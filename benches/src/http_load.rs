//! The in-process HTTP setup the HTTP suites share (`ratelimit`, `cache`,
//! `session`, `stack`).
//!
//! Every subject is an axum app served in process on 127.0.0.1 over real
//! TCP, with `into_make_service_with_connect_info::<SocketAddr>()` so that
//! layers keyed by client IP find the peer address. The load generator is a
//! hyper HTTP/1.1 client: one persistent keep-alive connection per task,
//! opened before the cell starts (see [`crate::cells`] for how cells run).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::serve::ListenerExt as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tower_redis_core::redis;
use tower_redis_core::testing::{Backend, TestRedis};
use tower_redis_core::{RedisConfig, RedisManager};

use crate::error::BenchError;
use crate::load::Operation;
use crate::server::{BenchRedis, CommandStat};

/// One in-process HTTP server, stopped (accept loop aborted) on drop.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `app` on 127.0.0.1 (a free port), with the peer address in
/// `ConnectInfo<SocketAddr>` and `TCP_NODELAY` on every accepted socket.
pub(crate) async fn serve(app: Router) -> Result<Server, BenchError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let listener = listener.tap_io(|tcp: &mut TcpStream| {
        // Best effort: a socket without NODELAY only makes this side slower.
        let _ = tcp.set_nodelay(true);
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    Ok(Server { addr, task })
}

/// Why one request did not count.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    #[error("connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("http: {0}")]
    Hyper(#[from] hyper::Error),
    #[error("request: {0}")]
    Request(#[from] http::Error),
    #[error("in-process body: {0}")]
    InProcessBody(#[from] axum::Error),
    #[error("status {got}, expected {expected}")]
    Status {
        got: StatusCode,
        expected: StatusCode,
    },
    #[error("body of {got} bytes ({start:?}...), expected {expected} bytes")]
    Body {
        got: usize,
        start: Bytes,
        expected: usize,
    },
}

/// The client half of one keep-alive connection.
pub(crate) type Sender = SendRequest<Empty<Bytes>>;

/// Opens one keep-alive HTTP/1.1 connection; its driver runs in its own
/// task and ends when the returned sender is dropped.
pub(crate) async fn connect(addr: SocketAddr) -> Result<Sender, HttpError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// What a task sends, every time: a method, a path and its fields (`Host`
/// is always `127.0.0.1`). The body is empty.
#[derive(Debug, Clone)]
pub(crate) struct HttpRequest {
    pub(crate) method: Method,
    pub(crate) path: &'static str,
    pub(crate) fields: HeaderMap,
}

impl HttpRequest {
    /// `GET path`.
    pub(crate) fn get(path: &'static str) -> Self {
        Self {
            method: Method::GET,
            path,
            fields: HeaderMap::new(),
        }
    }

    /// `POST path`.
    pub(crate) fn post(path: &'static str) -> Self {
        Self {
            method: Method::POST,
            ..Self::get(path)
        }
    }

    /// The request's head as every cell sends it (`Host: 127.0.0.1`).
    fn builder(&self) -> http::request::Builder {
        let mut builder = Request::builder()
            .method(self.method.clone())
            .uri(self.path)
            .header(header::HOST, "127.0.0.1");
        for (name, value) in &self.fields {
            builder = builder.header(name, value);
        }
        builder
    }

    /// The same request with a `Cookie` field.
    pub(crate) fn with_cookie(mut self, cookie: &str) -> Result<Self, BenchError> {
        let value = HeaderValue::from_str(cookie)
            .map_err(|e| BenchError::Check(format!("cookie {cookie:?}: {e}")))?;
        self.fields.insert(header::COOKIE, value);
        Ok(self)
    }
}

/// Sends `request` on `sender`: the status, the fields and the whole body.
pub(crate) async fn send(
    sender: &mut Sender,
    request: &HttpRequest,
) -> Result<(StatusCode, HeaderMap, Bytes), HttpError> {
    sender.ready().await?;
    let response = sender
        .send_request(request.builder().body(Empty::new())?)
        .await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// What every response of a cell must be.
#[derive(Debug, Clone)]
pub(crate) struct Expect {
    pub(crate) status: StatusCode,
    /// The body of a 200, if it is checked.
    pub(crate) body: Option<Bytes>,
}

impl Expect {
    /// A 200 with this body.
    pub(crate) fn ok(body: Option<Bytes>) -> Self {
        Self {
            status: StatusCode::OK,
            body,
        }
    }

    fn check(&self, status: StatusCode, body: &Bytes) -> Result<(), HttpError> {
        if status != self.status {
            return Err(HttpError::Status {
                got: status,
                expected: self.status,
            });
        }
        if let Some(expected) = &self.body
            && status == StatusCode::OK
            && body != expected
        {
            return Err(HttpError::Body {
                got: body.len(),
                start: body.slice(..body.len().min(32)),
                expected: expected.len(),
            });
        }
        Ok(())
    }
}

/// One task's request on its own connection, checking every response.
pub(crate) struct HttpCall {
    /// Opened before the cell; reopened if missing.
    pub(crate) sender: Option<Sender>,
    pub(crate) addr: SocketAddr,
    pub(crate) request: Arc<HttpRequest>,
    pub(crate) expect: Arc<Expect>,
}

impl Operation for HttpCall {
    type Error = HttpError;

    async fn call(&mut self) -> Result<(), HttpError> {
        let sender = match self.sender.take() {
            Some(sender) => sender,
            None => connect(self.addr).await?,
        };
        let sender = self.sender.insert(sender);
        let (status, _, body) = send(sender, &self.request).await?;
        self.expect.check(status, &body)
    }
}

/// One request to an app called in process (`tower::ServiceExt::oneshot`
/// on the axum `Router`): the layer's own cost, without TCP or HTTP
/// parsing, to set against raw Redis commands (which have neither).
pub(crate) struct InProcessCall {
    pub(crate) app: Router,
    pub(crate) request: Arc<HttpRequest>,
    pub(crate) expect: Arc<Expect>,
}

impl Operation for InProcessCall {
    type Error = HttpError;

    async fn call(&mut self) -> Result<(), HttpError> {
        use tower::ServiceExt as _;
        let request = self.request.builder().body(axum::body::Body::empty())?;
        let response = match self.app.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        self.expect.check(parts.status, &body)
    }
}

/// The Redis a `Redis down` manager points at: nothing listens there.
pub(crate) struct DeadRedis {
    pub(crate) url: String,
    pub(crate) how: &'static str,
    /// Kept so that its directory outlives the run.
    _stopped: Option<TestRedis>,
}

pub(crate) async fn dead_redis() -> Result<DeadRedis, BenchError> {
    if let Ok(test) = TestRedis::builder().start().await
        && test.backend() != Backend::Url
    {
        test.stop().await;
        return Ok(DeadRedis {
            url: test.url().to_owned(),
            how: "a second TestRedis, stopped before the manager connected",
            _stopped: Some(test),
        });
    }
    // No stoppable test server (REDIS_URL only): a port nothing listens on.
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = listener.local_addr()?.port();
    drop(listener);
    Ok(DeadRedis {
        url: format!("redis://127.0.0.1:{port}"),
        how: "a closed local port (no stoppable TestRedis backend)",
        _stopped: None,
    })
}

/// A manager on `url` whose keys live under `key_prefix`.
pub(crate) async fn manager_for(
    url: &str,
    pool_size: u32,
    key_prefix: &str,
) -> Result<RedisManager, BenchError> {
    let config = RedisConfig::builder()
        .url(url)
        .pool_size(pool_size)
        .key_prefix(key_prefix)
        .build()?;
    Ok(RedisManager::connect(config).await?)
}

/// A manager that reaches the bench Redis, and one that cannot reach any.
pub(crate) async fn managers(
    redis: &BenchRedis,
    pool_size: u32,
    key_prefix: &str,
) -> Result<(RedisManager, RedisManager, DeadRedis), BenchError> {
    let manager = manager_for(redis.url(), pool_size, key_prefix).await?;
    if !manager.is_available() {
        return Err(BenchError::Check(format!(
            "the manager cannot reach Redis: {:?}",
            manager.health()
        )));
    }
    let dead = dead_redis().await?;
    let down = manager_for(&dead.url, pool_size, key_prefix).await?;
    if down.is_available() {
        return Err(BenchError::Check(format!(
            "the `Redis down` manager reaches a Redis at {}",
            dead.url
        )));
    }
    Ok((manager, down, dead))
}

/// Deletes every key under `prefix`.
pub(crate) async fn clear_keys(redis: &BenchRedis, prefix: &str) -> Result<(), BenchError> {
    clear_matching(redis, &format!("{prefix}:*")).await
}

/// Deletes every key matching the glob `pattern`, a thousand at a time
/// (`SCAN`: no single command walks the whole keyspace, so none outlasts
/// the connection's response timeout).
pub(crate) async fn clear_matching(redis: &BenchRedis, pattern: &str) -> Result<(), BenchError> {
    let mut conn = redis.admin();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("DEL")
                .arg(&keys)
                .query_async::<()>(&mut conn)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// The commands in a delta that a client sent: their calls, and the server
/// time they took. `inner` names the commands the subject's scripts run
/// inside their EVALSHA: `INFO commandstats` counts them as if a client
/// had sent them, so they are left out (their time is already in the
/// EVALSHA's).
pub(crate) fn top_level(deltas: &BTreeMap<String, CommandStat>, inner: &[&str]) -> CommandStat {
    deltas
        .iter()
        .filter(|(name, _)| !inner.contains(&name.as_str()))
        .fold(CommandStat::default(), |sum, (_, stat)| CommandStat {
            calls: sum.calls + stat.calls,
            usec: sum.usec + stat.usec,
        })
}

/// Creates `count` sessions on the app at `addr` (a `POST /write` without a
/// cookie each) and returns `request` with the cookie of each.
pub(crate) async fn create_sessions(
    addr: SocketAddr,
    label: &str,
    request: HttpRequest,
    count: usize,
) -> Result<Vec<Arc<HttpRequest>>, BenchError> {
    let failed = |e: HttpError| BenchError::Check(format!("{label}: {e}"));
    let mut sender = connect(addr).await.map_err(failed)?;
    let mut requests = Vec::with_capacity(count);
    for _ in 0..count {
        let (status, fields, _) = send(&mut sender, &HttpRequest::post("/write"))
            .await
            .map_err(failed)?;
        let cookie = fields
            .get(header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .unwrap_or("")
            .to_owned();
        if status != StatusCode::OK || !cookie.contains('=') {
            return Err(BenchError::Check(format!(
                "{label}: expected 200 and a Set-Cookie from POST /write, got {status} and {cookie:?}"
            )));
        }
        requests.push(Arc::new(request.clone().with_cookie(&cookie)?));
    }
    Ok(requests)
}
