//! [`SessionLayer`] and its builder.

use std::sync::Arc;

use tower_layer::Layer;
use tower_redis_core::RedisManager;

use crate::config::{CookieConfig, Durability, Expiry};
use crate::id::CookieCodec;
use crate::service::SessionService;
use crate::store::{LocalLimits, SessionStore};

/// Signing keys shorter than this are refused.
const MIN_SIGNING_KEY: usize = 32;

/// Default [`SessionLayerBuilder::max_session_bytes`]: 64 KiB.
pub const DEFAULT_MAX_SESSION_BYTES: usize = 64 * 1024;
/// Default [`SessionLayerBuilder::outage_queue_bytes`]: 16 MiB.
pub const DEFAULT_OUTAGE_QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// Default [`SessionLayerBuilder::local_capacity_bytes`]: 32 MiB.
pub const DEFAULT_LOCAL_CAPACITY_BYTES: u64 = 32 * 1024 * 1024;
/// Default [`SessionLayerBuilder::tracked_capacity_bytes`]: 32 MiB.
pub const DEFAULT_TRACKED_CAPACITY_BYTES: u64 = 32 * 1024 * 1024;
/// What [`SessionLayerBuilder::local_capacity`] allows per session.
const BYTES_PER_SESSION: u64 = 4 * 1024;

/// A problem with the session configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The cookie settings cannot work.
    #[error("session cookie: {0}")]
    Cookie(String),
    /// The signing key is too short to be secret.
    #[error("the session signing key has {0} bytes; use at least 32 random bytes")]
    WeakSigningKey(usize),
    /// The timeouts contradict each other.
    #[error("session expiry: {0}")]
    Expiry(String),
    /// The size limits contradict each other.
    #[error("session size limits: {0}")]
    Limits(String),
    /// The durability cannot work with this manager.
    #[error("session durability: {0}")]
    Durability(String),
}

/// Adds a lazily loaded [`Session`](crate::Session) to every request.
#[derive(Clone, Debug)]
pub struct SessionLayer {
    pub(crate) shared: Arc<Shared>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) store: SessionStore,
    pub(crate) cookie: CookieConfig,
    pub(crate) cookie_name: String,
    pub(crate) codec: CookieCodec,
    pub(crate) expiry: Expiry,
    pub(crate) max_session_bytes: usize,
}

impl SessionLayer {
    /// Starts a builder on the shared connection manager.
    pub fn builder(manager: RedisManager) -> SessionLayerBuilder {
        SessionLayerBuilder {
            manager,
            cookie: CookieConfig::default(),
            expiry: Expiry::default(),
            signing_key: None,
            local_capacity_bytes: DEFAULT_LOCAL_CAPACITY_BYTES,
            outage_queue_bytes: DEFAULT_OUTAGE_QUEUE_BYTES,
            durability: Durability::Primary,
            max_session_bytes: DEFAULT_MAX_SESSION_BYTES,
            tracked_capacity_bytes: DEFAULT_TRACKED_CAPACITY_BYTES,
        }
    }

    /// The store, for store-level operations such as
    /// [`revoke_user`](SessionStore::revoke_user).
    pub fn store(&self) -> &SessionStore {
        &self.shared.store
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = SessionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SessionService::new(inner, Arc::clone(&self.shared))
    }
}

/// Configures a [`SessionLayer`].
#[derive(Debug)]
pub struct SessionLayerBuilder {
    manager: RedisManager,
    cookie: CookieConfig,
    expiry: Expiry,
    signing_key: Option<Vec<u8>>,
    local_capacity_bytes: u64,
    outage_queue_bytes: usize,
    max_session_bytes: usize,
    durability: Durability,
    tracked_capacity_bytes: u64,
}

impl SessionLayerBuilder {
    /// How many bytes of session copies this instance keeps exact with
    /// Redis client tracking (default 32 MiB; 0 turns tracking off). A read
    /// of a session unchanged since this instance last read it is then
    /// served from the copy, with no round trip; Redis tells the instance
    /// when any instance changes, deletes or expires it. The throttled
    /// idle-timeout renewal still goes to Redis. This instance's own
    /// updates keep its copy current (no read after a write).
    ///
    /// The guarantee: once another instance's change is acknowledged, this
    /// instance serves the old session only until its tracking connection
    /// has read Redis' invalidation (sent before that acknowledgement);
    /// [`SessionStore::sync`] waits for it. A lost tracking connection, an
    /// open breaker, a Sentinel failover or `FLUSHALL` drop every copy.
    /// Off on a Redis Cluster (see `tower_redis_core::tracking`).
    pub fn tracked_capacity_bytes(mut self, bytes: u64) -> Self {
        self.tracked_capacity_bytes = bytes;
        self
    }

    /// The cookie's attributes (defaults: `__Host-session`, `Secure`,
    /// `HttpOnly`, `SameSite=Lax`, `Path=/`).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::{get, post}};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response, StatusCode};
    /// # use tower_redis_session::{CookieConfig, Expiry, RedisManager, SameSite, Session, SessionLayer};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # /// A request carrying `cookie` (`name=value`, or "" for none).
    /// # fn req(method: &str, uri: &str, cookie: &str) -> Request<Body> {
    /// #     let mut request = Request::builder().method(method).uri(uri);
    /// #     if !cookie.is_empty() {
    /// #         request = request.header("cookie", cookie);
    /// #     }
    /// #     request.body(Body::empty()).unwrap()
    /// # }
    /// # /// The `name=value` part of the response's `Set-Cookie`.
    /// # fn cookie(response: &Response<Bytes>) -> String {
    /// #     let set_cookie = response.headers()["set-cookie"].to_str().unwrap();
    /// #     set_cookie.split(';').next().unwrap().to_owned()
    /// # }
    /// # /// A shop: `/login` logs alice in, `/me` says who is logged in, `/logout`
    /// # /// logs out, `/visits` counts visits in the session, `/` ignores it.
    /// # fn app(sessions: SessionLayer) -> Router {
    /// #     async fn login(session: Session) -> &'static str {
    /// #         session.cycle_id().await;
    /// #         session.set_user("alice").await;
    /// #         "welcome"
    /// #     }
    /// #     async fn me(session: Session) -> String {
    /// #         session.user().await.unwrap_or_default()
    /// #     }
    /// #     async fn logout(session: Session) -> StatusCode {
    /// #         session.destroy().await;
    /// #         StatusCode::NO_CONTENT
    /// #     }
    /// #     async fn visits(session: Session) -> String {
    /// #         let visits: u32 = session.get("visits").await.unwrap().unwrap_or(0) + 1;
    /// #         session.insert("visits", visits).await.unwrap();
    /// #         visits.to_string()
    /// #     }
    /// #     Router::new()
    /// #         .route("/", get(|| async { "home" }))
    /// #         .route("/login", post(login))
    /// #         .route("/me", get(me))
    /// #         .route("/logout", post(logout))
    /// #         .route("/visits", get(visits))
    /// #         .layer(sessions)
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let sessions = SessionLayer::builder(RedisManager::disabled())
    ///     .cookie(CookieConfig { name: "sid".into(), same_site: SameSite::Strict, ..CookieConfig::default() })
    ///     .build()?;
    /// let app = app(sessions);
    ///
    /// let login = send(&app, req("POST", "/login", "")).await;
    /// let set_cookie = login.headers()["set-cookie"].to_str()?;
    /// // Secure, no Domain, Path=/: the name gets the `__Host-` prefix.
    /// assert!(set_cookie.starts_with("__Host-sid="), "{set_cookie}");
    /// assert!(set_cookie.contains("SameSite=Strict"));
    /// # Ok(()) }
    /// ```
    pub fn cookie(mut self, cookie: CookieConfig) -> Self {
        self.cookie = cookie;
        self
    }

    /// Idle and absolute timeouts, and whether the cookie persists
    /// (defaults: 30 min idle, 12 h absolute, browser-session cookie).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::{get, post}};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response, StatusCode};
    /// # use tower_redis_session::{CookieConfig, Expiry, RedisManager, SameSite, Session, SessionLayer};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # /// A request carrying `cookie` (`name=value`, or "" for none).
    /// # fn req(method: &str, uri: &str, cookie: &str) -> Request<Body> {
    /// #     let mut request = Request::builder().method(method).uri(uri);
    /// #     if !cookie.is_empty() {
    /// #         request = request.header("cookie", cookie);
    /// #     }
    /// #     request.body(Body::empty()).unwrap()
    /// # }
    /// # /// The `name=value` part of the response's `Set-Cookie`.
    /// # fn cookie(response: &Response<Bytes>) -> String {
    /// #     let set_cookie = response.headers()["set-cookie"].to_str().unwrap();
    /// #     set_cookie.split(';').next().unwrap().to_owned()
    /// # }
    /// # /// A shop: `/login` logs alice in, `/me` says who is logged in, `/logout`
    /// # /// logs out, `/visits` counts visits in the session, `/` ignores it.
    /// # fn app(sessions: SessionLayer) -> Router {
    /// #     async fn login(session: Session) -> &'static str {
    /// #         session.cycle_id().await;
    /// #         session.set_user("alice").await;
    /// #         "welcome"
    /// #     }
    /// #     async fn me(session: Session) -> String {
    /// #         session.user().await.unwrap_or_default()
    /// #     }
    /// #     async fn logout(session: Session) -> StatusCode {
    /// #         session.destroy().await;
    /// #         StatusCode::NO_CONTENT
    /// #     }
    /// #     async fn visits(session: Session) -> String {
    /// #         let visits: u32 = session.get("visits").await.unwrap().unwrap_or(0) + 1;
    /// #         session.insert("visits", visits).await.unwrap();
    /// #         visits.to_string()
    /// #     }
    /// #     Router::new()
    /// #         .route("/", get(|| async { "home" }))
    /// #         .route("/login", post(login))
    /// #         .route("/me", get(me))
    /// #         .route("/logout", post(logout))
    /// #         .route("/visits", get(visits))
    /// #         .layer(sessions)
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let sessions = SessionLayer::builder(RedisManager::disabled())
    ///     .expiry(Expiry { idle: Duration::from_secs(3600), persistent: true, ..Expiry::default() })
    ///     .build()?;
    /// let app = app(sessions);
    ///
    /// let login = send(&app, req("POST", "/login", "")).await;
    /// // Persistent: the cookie outlives the browser for the idle timeout.
    /// assert!(login.headers()["set-cookie"].to_str()?.contains("Max-Age=3600"));
    /// # Ok(()) }
    /// ```
    pub fn expiry(mut self, expiry: Expiry) -> Self {
        self.expiry = expiry;
        self
    }

    /// Signs the cookie with HMAC-SHA256 under this key (at least 32 bytes,
    /// random, secret, the same on every instance). Cookies without a valid
    /// signature are treated as absent.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::{get, post}};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response, StatusCode};
    /// # use tower_redis_session::{CookieConfig, Expiry, RedisManager, SameSite, Session, SessionLayer};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # /// A request carrying `cookie` (`name=value`, or "" for none).
    /// # fn req(method: &str, uri: &str, cookie: &str) -> Request<Body> {
    /// #     let mut request = Request::builder().method(method).uri(uri);
    /// #     if !cookie.is_empty() {
    /// #         request = request.header("cookie", cookie);
    /// #     }
    /// #     request.body(Body::empty()).unwrap()
    /// # }
    /// # /// The `name=value` part of the response's `Set-Cookie`.
    /// # fn cookie(response: &Response<Bytes>) -> String {
    /// #     let set_cookie = response.headers()["set-cookie"].to_str().unwrap();
    /// #     set_cookie.split(';').next().unwrap().to_owned()
    /// # }
    /// # /// A shop: `/login` logs alice in, `/me` says who is logged in, `/logout`
    /// # /// logs out, `/visits` counts visits in the session, `/` ignores it.
    /// # fn app(sessions: SessionLayer) -> Router {
    /// #     async fn login(session: Session) -> &'static str {
    /// #         session.cycle_id().await;
    /// #         session.set_user("alice").await;
    /// #         "welcome"
    /// #     }
    /// #     async fn me(session: Session) -> String {
    /// #         session.user().await.unwrap_or_default()
    /// #     }
    /// #     async fn logout(session: Session) -> StatusCode {
    /// #         session.destroy().await;
    /// #         StatusCode::NO_CONTENT
    /// #     }
    /// #     async fn visits(session: Session) -> String {
    /// #         let visits: u32 = session.get("visits").await.unwrap().unwrap_or(0) + 1;
    /// #         session.insert("visits", visits).await.unwrap();
    /// #         visits.to_string()
    /// #     }
    /// #     Router::new()
    /// #         .route("/", get(|| async { "home" }))
    /// #         .route("/login", post(login))
    /// #         .route("/me", get(me))
    /// #         .route("/logout", post(logout))
    /// #         .route("/visits", get(visits))
    /// #         .layer(sessions)
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let sessions = SessionLayer::builder(RedisManager::disabled())
    ///     .signing_key(*b"a 32-byte secret, from your vault")
    ///     .build()?;
    /// let app = app(sessions);
    ///
    /// let alice = cookie(&send(&app, req("POST", "/login", "")).await);
    /// assert_eq!(send(&app, req("GET", "/me", &alice)).await.body(), "alice");
    /// // A cookie whose signature does not match is no session at all.
    /// let mut tampered = alice.clone();
    /// let last = tampered.pop().unwrap();
    /// tampered.push(if last == 'A' { 'B' } else { 'A' });
    /// assert_eq!(send(&app, req("GET", "/me", &tampered)).await.body(), "");
    /// # Ok(()) }
    /// ```
    pub fn signing_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.signing_key = Some(key.into());
        self
    }

    /// Drops `Secure` (and so the `__Host-` prefix) so the cookie works over
    /// plain http on localhost. Never use it in production.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::{get, post}};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response, StatusCode};
    /// # use tower_redis_session::{CookieConfig, Expiry, RedisManager, SameSite, Session, SessionLayer};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # /// A request carrying `cookie` (`name=value`, or "" for none).
    /// # fn req(method: &str, uri: &str, cookie: &str) -> Request<Body> {
    /// #     let mut request = Request::builder().method(method).uri(uri);
    /// #     if !cookie.is_empty() {
    /// #         request = request.header("cookie", cookie);
    /// #     }
    /// #     request.body(Body::empty()).unwrap()
    /// # }
    /// # /// The `name=value` part of the response's `Set-Cookie`.
    /// # fn cookie(response: &Response<Bytes>) -> String {
    /// #     let set_cookie = response.headers()["set-cookie"].to_str().unwrap();
    /// #     set_cookie.split(';').next().unwrap().to_owned()
    /// # }
    /// # /// A shop: `/login` logs alice in, `/me` says who is logged in, `/logout`
    /// # /// logs out, `/visits` counts visits in the session, `/` ignores it.
    /// # fn app(sessions: SessionLayer) -> Router {
    /// #     async fn login(session: Session) -> &'static str {
    /// #         session.cycle_id().await;
    /// #         session.set_user("alice").await;
    /// #         "welcome"
    /// #     }
    /// #     async fn me(session: Session) -> String {
    /// #         session.user().await.unwrap_or_default()
    /// #     }
    /// #     async fn logout(session: Session) -> StatusCode {
    /// #         session.destroy().await;
    /// #         StatusCode::NO_CONTENT
    /// #     }
    /// #     async fn visits(session: Session) -> String {
    /// #         let visits: u32 = session.get("visits").await.unwrap().unwrap_or(0) + 1;
    /// #         session.insert("visits", visits).await.unwrap();
    /// #         visits.to_string()
    /// #     }
    /// #     Router::new()
    /// #         .route("/", get(|| async { "home" }))
    /// #         .route("/login", post(login))
    /// #         .route("/me", get(me))
    /// #         .route("/logout", post(logout))
    /// #         .route("/visits", get(visits))
    /// #         .layer(sessions)
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let sessions = SessionLayer::builder(RedisManager::disabled())
    ///     .insecure_http_for_local_development()
    ///     .build()?;
    /// let app = app(sessions);
    ///
    /// let login = send(&app, req("POST", "/login", "")).await;
    /// let set_cookie = login.headers()["set-cookie"].to_str()?;
    /// assert!(set_cookie.starts_with("session=") && !set_cookie.contains("Secure"), "{set_cookie}");
    /// # Ok(()) }
    /// ```
    pub fn insecure_http_for_local_development(mut self) -> Self {
        self.cookie.secure = false;
        self
    }

    /// How many bytes of session copies this instance keeps, to serve them
    /// while Redis is unavailable (default 32 MiB). Copies are weighed by
    /// their data plus a bookkeeping allowance; the least useful are
    /// evicted at the bound (their users look logged out on this instance
    /// during an outage, until Redis is back).
    pub fn local_capacity_bytes(mut self, bytes: u64) -> Self {
        self.local_capacity_bytes = bytes;
        self
    }

    /// The former count bound of the local copies, now a byte bound of
    /// 4 KiB per session: `local_capacity(n)` is
    /// `local_capacity_bytes(n × 4096)`.
    #[deprecated(note = "local copies are bounded by bytes: use `local_capacity_bytes`")]
    pub fn local_capacity(self, sessions: u64) -> Self {
        self.local_capacity_bytes(sessions.saturating_mul(BYTES_PER_SESSION))
    }

    /// How many bytes of changes made while Redis is unavailable this
    /// instance queues for writing when it is back (default 16 MiB).
    ///
    /// At the bound, nothing queued is dropped: a new session is not
    /// created (the visitor gets a fresh, empty session on the next
    /// request) and a change to an existing one is not kept, each with a
    /// warning. Log outs are never refused nor dropped, so an attacker who
    /// fills the queue cannot push out someone else's log out.
    pub fn outage_queue_bytes(mut self, bytes: usize) -> Self {
        self.outage_queue_bytes = bytes;
        self
    }

    /// How sure logins and logouts must be to survive a failover (default
    /// [`Durability::Primary`]). With
    /// [`Durability::Replicated`], the writes of a login (id cycle, or a
    /// save that sets the user) and of a logout wait for `WAIT replicas
    /// timeout` before the response: one more command in the same
    /// operation, paid by those requests only. Other session writes are
    /// unchanged. [`build`](Self::build) refuses a `timeout` that is not
    /// shorter than the manager's command timeout (the whole operation
    /// must fit in it), a `timeout` of 0 (`WAIT` would wait for ever), and
    /// `replicas` of 0.
    ///
    /// ```
    /// # use std::time::Duration;
    /// use tower_redis_session::{ConfigError, Durability, RedisManager, SessionLayer};
    ///
    /// let replicated = Durability::Replicated { replicas: 1, timeout: Duration::from_millis(50) };
    /// assert!(SessionLayer::builder(RedisManager::disabled()).durability(replicated).build().is_ok());
    /// let too_long = Durability::Replicated { replicas: 1, timeout: Duration::from_secs(5) };
    /// let refused = SessionLayer::builder(RedisManager::disabled()).durability(too_long).build();
    /// assert!(matches!(refused, Err(ConfigError::Durability(_))));
    /// let for_ever = Durability::Replicated { replicas: 1, timeout: Duration::ZERO };
    /// let refused = SessionLayer::builder(RedisManager::disabled()).durability(for_ever).build();
    /// assert!(matches!(refused, Err(ConfigError::Durability(_))));
    /// ```
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// The largest a session may be, in bytes of entry names, JSON values
    /// and user id (default 64 KiB). A [`Session::insert`](crate::Session::insert)
    /// that would take the session over it returns
    /// [`SessionError::TooLarge`](crate::SessionError::TooLarge) and changes
    /// nothing. Must not exceed `outage_queue_bytes` nor
    /// `local_capacity_bytes`, so that any session fits both.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::{get, post}};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response, StatusCode};
    /// # use tower_redis_session::{CookieConfig, Expiry, RedisManager, SameSite, Session, SessionLayer};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # /// A request carrying `cookie` (`name=value`, or "" for none).
    /// # fn req(method: &str, uri: &str, cookie: &str) -> Request<Body> {
    /// #     let mut request = Request::builder().method(method).uri(uri);
    /// #     if !cookie.is_empty() {
    /// #         request = request.header("cookie", cookie);
    /// #     }
    /// #     request.body(Body::empty()).unwrap()
    /// # }
    /// # /// The `name=value` part of the response's `Set-Cookie`.
    /// # fn cookie(response: &Response<Bytes>) -> String {
    /// #     let set_cookie = response.headers()["set-cookie"].to_str().unwrap();
    /// #     set_cookie.split(';').next().unwrap().to_owned()
    /// # }
    /// # /// A shop: `/login` logs alice in, `/me` says who is logged in, `/logout`
    /// # /// logs out, `/visits` counts visits in the session, `/` ignores it.
    /// # fn app(sessions: SessionLayer) -> Router {
    /// #     async fn login(session: Session) -> &'static str {
    /// #         session.cycle_id().await;
    /// #         session.set_user("alice").await;
    /// #         "welcome"
    /// #     }
    /// #     async fn me(session: Session) -> String {
    /// #         session.user().await.unwrap_or_default()
    /// #     }
    /// #     async fn logout(session: Session) -> StatusCode {
    /// #         session.destroy().await;
    /// #         StatusCode::NO_CONTENT
    /// #     }
    /// #     async fn visits(session: Session) -> String {
    /// #         let visits: u32 = session.get("visits").await.unwrap().unwrap_or(0) + 1;
    /// #         session.insert("visits", visits).await.unwrap();
    /// #         visits.to_string()
    /// #     }
    /// #     Router::new()
    /// #         .route("/", get(|| async { "home" }))
    /// #         .route("/login", post(login))
    /// #         .route("/me", get(me))
    /// #         .route("/logout", post(logout))
    /// #         .route("/visits", get(visits))
    /// #         .layer(sessions)
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_redis_session::SessionError;
    ///
    /// let sessions = SessionLayer::builder(RedisManager::disabled())
    ///     .max_session_bytes(1024)
    ///     .build()?;
    /// async fn remember(session: Session, note: String) -> StatusCode {
    ///     match session.insert("note", note).await {
    ///         Ok(()) => StatusCode::OK,
    ///         Err(SessionError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
    ///         Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    ///     }
    /// }
    /// let app = Router::new().route("/note", post(remember)).layer(sessions);
    /// let note = |text: String| Request::post("/note").body(Body::from(text)).unwrap();
    ///
    /// assert_eq!(send(&app, note("short".into())).await.status(), StatusCode::OK);
    /// assert_eq!(send(&app, note("x".repeat(2000))).await.status(), StatusCode::PAYLOAD_TOO_LARGE);
    /// # Ok(()) }
    /// ```
    pub fn max_session_bytes(mut self, bytes: usize) -> Self {
        self.max_session_bytes = bytes;
        self
    }

    /// Checks everything and builds the layer.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::{get, post}};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response, StatusCode};
    /// # use tower_redis_session::{CookieConfig, Expiry, RedisManager, SameSite, Session, SessionLayer};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # /// A request carrying `cookie` (`name=value`, or "" for none).
    /// # fn req(method: &str, uri: &str, cookie: &str) -> Request<Body> {
    /// #     let mut request = Request::builder().method(method).uri(uri);
    /// #     if !cookie.is_empty() {
    /// #         request = request.header("cookie", cookie);
    /// #     }
    /// #     request.body(Body::empty()).unwrap()
    /// # }
    /// # /// The `name=value` part of the response's `Set-Cookie`.
    /// # fn cookie(response: &Response<Bytes>) -> String {
    /// #     let set_cookie = response.headers()["set-cookie"].to_str().unwrap();
    /// #     set_cookie.split(';').next().unwrap().to_owned()
    /// # }
    /// # /// A shop: `/login` logs alice in, `/me` says who is logged in, `/logout`
    /// # /// logs out, `/visits` counts visits in the session, `/` ignores it.
    /// # fn app(sessions: SessionLayer) -> Router {
    /// #     async fn login(session: Session) -> &'static str {
    /// #         session.cycle_id().await;
    /// #         session.set_user("alice").await;
    /// #         "welcome"
    /// #     }
    /// #     async fn me(session: Session) -> String {
    /// #         session.user().await.unwrap_or_default()
    /// #     }
    /// #     async fn logout(session: Session) -> StatusCode {
    /// #         session.destroy().await;
    /// #         StatusCode::NO_CONTENT
    /// #     }
    /// #     async fn visits(session: Session) -> String {
    /// #         let visits: u32 = session.get("visits").await.unwrap().unwrap_or(0) + 1;
    /// #         session.insert("visits", visits).await.unwrap();
    /// #         visits.to_string()
    /// #     }
    /// #     Router::new()
    /// #         .route("/", get(|| async { "home" }))
    /// #         .route("/login", post(login))
    /// #         .route("/me", get(me))
    /// #         .route("/logout", post(logout))
    /// #         .route("/visits", get(visits))
    /// #         .layer(sessions)
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_redis_session::ConfigError;
    ///
    /// let weak = SessionLayer::builder(RedisManager::disabled()).signing_key(*b"short").build();
    /// assert!(matches!(weak, Err(ConfigError::WeakSigningKey(5))));
    /// let no_idle = Expiry { idle: Duration::ZERO, ..Expiry::default() };
    /// assert!(SessionLayer::builder(RedisManager::disabled()).expiry(no_idle).build().is_err());
    /// # Ok(()) }
    /// ```
    pub fn build(self) -> Result<SessionLayer, ConfigError> {
        self.cookie.validate().map_err(ConfigError::Cookie)?;
        if let Some(key) = &self.signing_key
            && key.len() < MIN_SIGNING_KEY
        {
            return Err(ConfigError::WeakSigningKey(key.len()));
        }
        if self.expiry.idle.is_zero() || self.expiry.absolute.is_zero() {
            return Err(ConfigError::Expiry(
                "idle and absolute timeouts must be positive".to_owned(),
            ));
        }
        let year = std::time::Duration::from_secs(366 * 24 * 3600);
        if self.expiry.absolute > year {
            return Err(ConfigError::Expiry(format!(
                "the absolute timeout ({:?}) is longer than a year; sessions that long are credentials that never expire",
                self.expiry.absolute
            )));
        }
        if self.expiry.idle > self.expiry.absolute {
            return Err(ConfigError::Expiry(format!(
                "the idle timeout ({:?}) is longer than the absolute one ({:?})",
                self.expiry.idle, self.expiry.absolute
            )));
        }
        if self.max_session_bytes == 0 {
            return Err(ConfigError::Limits(
                "max_session_bytes must be positive".to_owned(),
            ));
        }
        if self.max_session_bytes > self.outage_queue_bytes
            || u64::try_from(self.max_session_bytes).unwrap_or(u64::MAX) > self.local_capacity_bytes
        {
            return Err(ConfigError::Limits(format!(
                "max_session_bytes ({}) is larger than outage_queue_bytes ({}) or local_capacity_bytes ({}); a session of the maximum size must fit both: raise them or lower max_session_bytes",
                self.max_session_bytes, self.outage_queue_bytes, self.local_capacity_bytes
            )));
        }
        if let Durability::Replicated { replicas, timeout } = self.durability
            && (replicas == 0 || timeout.is_zero() || timeout >= self.manager.command_timeout())
        {
            return Err(ConfigError::Durability(format!(
                "Replicated {{ replicas: {replicas}, timeout: {timeout:?} }} needs at least one replica and a timeout above 0 (WAIT with 0 waits for ever) and shorter than the Redis command timeout ({:?}), which bounds the whole save",
                self.manager.command_timeout()
            )));
        }
        let store = SessionStore::with_durability(
            self.manager,
            self.expiry,
            LocalLimits {
                copies_bytes: self.local_capacity_bytes,
                queue_bytes: self.outage_queue_bytes,
                tracked_bytes: self.tracked_capacity_bytes,
            },
            self.durability,
        );
        Ok(SessionLayer {
            shared: Arc::new(Shared {
                store,
                cookie_name: self.cookie.wire_name(),
                cookie: self.cookie,
                codec: CookieCodec::new(self.signing_key),
                expiry: self.expiry,
                max_session_bytes: self.max_session_bytes,
            }),
        })
    }
}
