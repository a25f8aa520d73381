//! [`Session`]: the handle a handler uses. Nothing is loaded until it is
//! used, and nothing is written unless something changed.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;

use crate::id::SessionId;
use crate::layer::Shared;
use crate::store::{Changes, EndMark, Known, Record, Saved, SessionStore, now_ms};

/// Why a session operation failed. Redis trouble is never one of them: the
/// session falls back to the in-process store instead.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// A value could not be turned into JSON, or a stored value into the
    /// requested type.
    #[error("session entry {key:?}: {source}")]
    Serde {
        /// The entry.
        key: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// The change would take the session over its size limit
    /// ([`SessionLayerBuilder::max_session_bytes`](crate::SessionLayerBuilder::max_session_bytes)).
    /// Nothing was changed.
    #[error(
        "session entry {key:?} would make the session {size} bytes, over its limit of {limit}; keep large data out of the session (store it elsewhere and keep its id) or raise SessionLayerBuilder::max_session_bytes"
    )]
    TooLarge {
        /// The entry.
        key: String,
        /// The session's size with the change: entry names, JSON values and
        /// user id, in bytes.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

/// The session of the current request.
///
/// Cheap to clone; clones share state. Get it from the request extensions,
/// or as an axum extractor.
#[derive(Clone)]
pub struct Session {
    /// One allocation a request: a clone (the extension, the extractor)
    /// touches this request's count only, not the store's, which every
    /// request shares.
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// The layer's settings and store: one count every request shares,
    /// taken once a request (the response's end reads them here too).
    shared: Arc<Shared>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct State {
    /// The id the request's cookie carried (unverified until loaded).
    cookie_id: Option<SessionId>,
    phase: Phase,
    /// The id the session has in the store, once it is known to exist.
    id: Option<SessionId>,
    record: Record,
    changes: Changes,
    /// Set by `cycle_id`: the session moves to a new id on save.
    cycle: bool,
    /// Set by `destroy`: the stored session to delete (and its user).
    delete: Option<(SessionId, Option<String>)>,
    /// The session's size as this request sees it (record and changes):
    /// entry names, JSON values and user id, in bytes. `None` until a
    /// change needs it: a read does not measure the record.
    size: Option<usize>,
    /// The store's end mark when the request began: what it asks whether
    /// its session ended since (a concurrent login or logout).
    ends_mark: EndMark,
    /// Redis did not answer this request in time (its load or delete timed
    /// out): its writes are queued without asking Redis again, unless an
    /// operation has succeeded since, so that the request waits for Redis
    /// at most one command timeout.
    waited: bool,
}

impl State {
    /// The session's size as this request sees it (measured on first use).
    fn size(&mut self) -> usize {
        *self.size.get_or_insert_with(|| self.record.size())
    }

    /// What entry `key` counts toward the session's size now.
    fn entry_size(&self, key: &str) -> usize {
        let json = match self.changes.entries.get(key) {
            Some(change) => change.as_deref(),
            None => self.record.fields.get(key).map(String::as_str),
        };
        json.map_or(0, |json| key.len() + json.len())
    }

    fn user_size(&self) -> usize {
        self.changes
            .user
            .as_ref()
            .or(self.record.user.as_ref())
            .map_or(0, String::len)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Untouched,
    Loaded,
    Destroyed,
}

/// What the layer must do to the response after the handler ran.
#[derive(Debug)]
pub(crate) enum CookieUpdate {
    /// Send this id.
    Set(SessionId),
    /// Tell the browser to drop the cookie.
    Remove,
}

impl Session {
    pub(crate) fn new(shared: Arc<Shared>, cookie_id: Option<SessionId>) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    cookie_id,
                    phase: Phase::Untouched,
                    id: None,
                    record: Record::default(),
                    changes: Changes::default(),
                    cycle: false,
                    delete: None,
                    size: None,
                    ends_mark: shared.store.end_mark(),
                    waited: false,
                }),
                shared,
            }),
        }
    }

    /// The layer's settings and store.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// Loads the session on first use: one round trip, and only when the
    /// request carried a well-formed id. An id the store does not know is
    /// never adopted.
    async fn loaded(&self) -> tokio::sync::MutexGuard<'_, State> {
        let mut state = self.inner.state.lock().await;
        if state.phase == Phase::Untouched {
            state.phase = Phase::Loaded;
            if let Some(cookie_id) = state.cookie_id {
                let storage_key = cookie_id.storage_key();
                // A tracked copy answers here, with no future. The load
                // that waits is boxed: inlined, it made the future of every
                // session read (part of the handler's future) larger than
                // the allocator's per-thread cache takes.
                let record = match self.inner.shared.store.load_now(&storage_key) {
                    Ok(record) => Some(record),
                    Err(later) => {
                        let loaded =
                            Box::pin(self.inner.shared.store.load_later(&storage_key, later)).await;
                        state.waited = loaded.waited;
                        loaded.record
                    }
                };
                if let Some(record) = record {
                    state.id = Some(cookie_id);
                    state.size = None;
                    state.record = record;
                }
            }
        }
        state
    }

    /// The value of `key`, if the session has one.
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
    /// let app = app(SessionLayer::builder(RedisManager::disabled()).build()?);
    ///
    /// let first = send(&app, req("GET", "/visits", "")).await;
    /// assert_eq!(first.body(), "1");
    /// let visitor = cookie(&first);
    /// assert_eq!(send(&app, req("GET", "/visits", &visitor)).await.body(), "2");
    /// assert_eq!(send(&app, req("GET", "/visits", "")).await.body(), "1"); // someone else
    /// # Ok(()) }
    /// ```
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        let state = self.loaded().await;
        let json = match state.changes.entries.get(key) {
            Some(change) => change.as_deref(),
            None => state.record.fields.get(key).map(String::as_str),
        };
        json.map(|json| serde_json::from_str(json).map_err(|source| serde_error(key, source)))
            .transpose()
    }

    /// Sets `key` to `value`.
    ///
    /// Fails with [`SessionError::TooLarge`], changing nothing, when the
    /// session would grow over
    /// [`max_session_bytes`](crate::SessionLayerBuilder::max_session_bytes).
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
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Cart {
    ///     items: Vec<String>,
    /// }
    /// async fn add(session: Session) -> String {
    ///     let mut cart: Cart = session.get("cart").await.unwrap().unwrap_or(Cart { items: vec![] });
    ///     cart.items.push("mug".into());
    ///     session.insert("cart", &cart).await.unwrap(); // any serde value, stored as JSON
    ///     cart.items.len().to_string()
    /// }
    /// let sessions = SessionLayer::builder(RedisManager::disabled()).build()?;
    /// let app = Router::new().route("/cart", post(add)).layer(sessions);
    ///
    /// let first = send(&app, req("POST", "/cart", "")).await;
    /// assert_eq!(send(&app, req("POST", "/cart", &cookie(&first))).await.body(), "2");
    /// # Ok(()) }
    /// ```
    pub async fn insert<T: Serialize>(&self, key: &str, value: T) -> Result<(), SessionError> {
        let json = serde_json::to_string(&value).map_err(|source| serde_error(key, source))?;
        let mut state = self.loaded().await;
        let (old, new) = (state.entry_size(key), key.len() + json.len());
        let current = state.size();
        let size = current - old.min(current) + new;
        // A session already over the limit (the limit was lowered) may
        // still shrink.
        if new > old && size > self.inner.shared.max_session_bytes {
            return Err(SessionError::TooLarge {
                key: key.to_owned(),
                size,
                limit: self.inner.shared.max_session_bytes,
            });
        }
        state.size = Some(size);
        // Writing after `destroy` starts a new session.
        state.phase = Phase::Loaded;
        state.changes.entries.insert(key.to_owned(), Some(json));
        Ok(())
    }

    /// Removes `key`, returning its value.
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
    /// async fn take_flash(session: Session) -> String {
    ///     // Read once: the message is gone afterwards.
    ///     session.remove::<String>("flash").await.unwrap().unwrap_or_default()
    /// }
    /// async fn set_flash(session: Session) {
    ///     session.insert("flash", "Saved!").await.unwrap();
    /// }
    /// let sessions = SessionLayer::builder(RedisManager::disabled()).build()?;
    /// let app = Router::new().route("/flash", get(take_flash).post(set_flash)).layer(sessions);
    ///
    /// let visitor = cookie(&send(&app, req("POST", "/flash", "")).await);
    /// assert_eq!(send(&app, req("GET", "/flash", &visitor)).await.body(), "Saved!");
    /// assert_eq!(send(&app, req("GET", "/flash", &visitor)).await.body(), "");
    /// # Ok(()) }
    /// ```
    pub async fn remove<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        let previous = self.get(key).await?;
        let mut state = self.loaded().await;
        let old = state.entry_size(key);
        state.size = Some(state.size().saturating_sub(old));
        state.changes.entries.insert(key.to_owned(), None);
        Ok(previous)
    }

    /// Removes every entry (the session and its id stay).
    pub async fn clear(&self) {
        let mut state = self.loaded().await;
        let names: Vec<String> = state
            .record
            .fields
            .keys()
            .chain(state.changes.entries.keys())
            .cloned()
            .collect();
        for name in names {
            state.changes.entries.insert(name, None);
        }
        state.size = Some(state.user_size());
    }

    /// Gives the session a new id, for privilege changes (log in, sudo): the
    /// old id stops working when this response is sent.
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
    /// let app = app(SessionLayer::builder(RedisManager::disabled()).build()?);
    ///
    /// // A visitor with a session logs in: the id changes (no session fixation).
    /// let before = cookie(&send(&app, req("GET", "/visits", "")).await);
    /// let after = cookie(&send(&app, req("POST", "/login", &before)).await);
    /// assert_ne!(before, after);
    /// assert_eq!(send(&app, req("GET", "/me", &after)).await.body(), "alice");
    /// // The data moved with it; the old id no longer works.
    /// assert_eq!(send(&app, req("GET", "/visits", &after)).await.body(), "2");
    /// assert_eq!(send(&app, req("GET", "/me", &before)).await.body(), "");
    /// # Ok(()) }
    /// ```
    pub async fn cycle_id(&self) {
        let mut state = self.loaded().await;
        state.cycle = true;
    }

    /// Ends the session (log out): it is deleted from the store and the
    /// browser is told to drop the cookie.
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
    /// let app = app(SessionLayer::builder(RedisManager::disabled()).build()?);
    ///
    /// let alice = cookie(&send(&app, req("POST", "/login", "")).await);
    /// let logout = send(&app, req("POST", "/logout", &alice)).await;
    /// // The browser is told to drop the cookie, and the session is gone.
    /// assert!(logout.headers()["set-cookie"].to_str()?.contains("Max-Age=0"));
    /// assert_eq!(send(&app, req("GET", "/me", &alice)).await.body(), "");
    /// # Ok(()) }
    /// ```
    pub async fn destroy(&self) {
        let mut state = self.loaded().await;
        if let Some(id) = state.id.take() {
            let user = state.record.user.clone();
            state.delete = Some((id, user));
        }
        state.phase = Phase::Destroyed;
        state.record = Record::default();
        state.changes = Changes::default();
        state.cycle = false;
        state.size = Some(0);
    }

    /// Associates the session with a user, for
    /// [`SessionStore::list_user_sessions`] and [`SessionStore::revoke_user`].
    ///
    /// The user id counts toward the session's size, but this never fails:
    /// user ids come from the app's authentication, and one that alone
    /// takes the session over the limit is kept (later inserts that grow
    /// the session are refused).
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
    /// let app = app(SessionLayer::builder(RedisManager::disabled()).build()?);
    ///
    /// let alice = cookie(&send(&app, req("POST", "/login", "")).await);
    /// assert_eq!(send(&app, req("GET", "/me", &alice)).await.body(), "alice");
    /// // A request that does not touch the session gets no cookie at all.
    /// assert!(send(&app, req("GET", "/", &alice)).await.headers().get("set-cookie").is_none());
    /// # Ok(()) }
    /// ```
    pub async fn set_user(&self, user: &str) {
        let mut state = self.loaded().await;
        let old = state.user_size();
        state.size = Some(state.size().saturating_sub(old) + user.len());
        // Like `insert`, after `destroy` this starts a new session.
        state.phase = Phase::Loaded;
        state.changes.user = Some(user.to_owned());
    }

    /// The user set with [`set_user`](Self::set_user), if any.
    pub async fn user(&self) -> Option<String> {
        let state = self.loaded().await;
        state
            .changes
            .user
            .clone()
            .or_else(|| state.record.user.clone())
    }

    /// The store behind this session (for "log out everywhere" and such).
    pub fn store(&self) -> &SessionStore {
        &self.inner.shared.store
    }

    /// Writes what the handler changed; says what the cookie must become.
    pub(crate) async fn finish(&self) -> Option<CookieUpdate> {
        let mut state = self.inner.state.lock().await;
        // The store's writes are boxed where they are awaited: inlined,
        // their Redis futures made the layer's future (allocated and moved
        // on every request, reads included) several KiB larger.
        let deleted = state.delete.take();
        if let Some((id, user)) = &deleted {
            let storage_key = id.storage_key();
            let delete =
                self.inner
                    .shared
                    .store
                    .delete(&storage_key, user.as_deref(), state.waited);
            state.waited |= Box::pin(delete).await;
        }
        match state.phase {
            Phase::Untouched => None,
            // The cookie is removed when this request ended its session, or
            // when the cookie named none (expired, unknown); not when another
            // request ended it meanwhile (a concurrent login's cycle), since
            // the browser may already hold the id that replaced it.
            Phase::Destroyed => self.removal(&state, deleted.is_some()),
            Phase::Loaded => self.write(&mut state, deleted.is_some()).await,
        }
    }

    /// What [`finish`](Self::finish) answers, then (for a persistent
    /// cookie, when it answers nothing) [`live_id`](Self::live_id), when
    /// neither has anything to write or wait for: a session the handler left
    /// untouched, only read, or destroyed with nothing stored. `None` when
    /// they must run: something to write or delete, or the session held by
    /// another task (a clone the handler kept).
    ///
    /// The same answers, computed in place: most requests change nothing,
    /// and the layer's response future then needs no future of its own.
    pub(crate) fn finish_now(&self, persistent: bool) -> Option<Option<CookieUpdate>> {
        let state = self.inner.state.try_lock().ok()?;
        if state.delete.is_some() {
            return None;
        }
        let update = match state.phase {
            Phase::Untouched => None,
            Phase::Destroyed => self.removal(&state, false),
            // What `write` answers without a write: a new session with
            // nothing in it, or a stored one read and not changed.
            Phase::Loaded => {
                let unchanged = match state.id {
                    None => !state.changes.creates(),
                    Some(_) => !state.cycle && state.changes.is_empty(),
                };
                if !unchanged {
                    return None;
                }
                None
            }
        };
        Some(match update {
            Some(update) => Some(update),
            None if persistent => self.live_id_in(&state).map(CookieUpdate::Set),
            None => None,
        })
    }

    /// The cookie's removal for a destroyed session (`finish` says when);
    /// `deleted`: this request deleted a stored one.
    fn removal(&self, state: &State, deleted: bool) -> Option<CookieUpdate> {
        state
            .cookie_id
            .as_ref()
            .filter(|cookie| {
                deleted
                    || !self
                        .inner
                        .shared
                        .store
                        .ended_since(&cookie.storage_key(), state.ends_mark)
            })
            .map(|_| CookieUpdate::Remove)
    }

    /// Stores the changes. When the store says the session is gone
    /// (destroyed, revoked, cycled or expired by another request), no cookie
    /// is sent at all: the browser may already hold the id that replaced
    /// it, from a concurrent login, and a removal or a refresh of the old id
    /// would log that login out. Only a request that destroys the session
    /// itself tells the browser to drop the cookie.
    ///
    /// `ended_here`: this request destroyed its session (and then wrote to
    /// a new one).
    async fn write(&self, state: &mut State, ended_here: bool) -> Option<CookieUpdate> {
        let Some(id) = state.id else {
            // A new session is stored only once it holds something.
            if !state.changes.creates() {
                return None;
            }
            // The cookie names a session whose id another request cycled
            // away (a concurrent login), or may have (a flood of ends made
            // this instance forget one since the request began): a change
            // that is no login itself stores nothing and sends no cookie,
            // as a change that finds its session gone. A new session's
            // cookie would replace the one that login set. (A session
            // destroyed or revoked has no successor: a write after it, this
            // request's own logout included, starts a new session.)
            if state.changes.user.is_none()
                && !state.cycle
                && !ended_here
                && let Some(cookie) = state.cookie_id.as_ref()
            {
                let storage_key = cookie.storage_key();
                if let Some(known) = self
                    .inner
                    .shared
                    .store
                    .cycled_since(&storage_key, state.ends_mark)
                {
                    dropped_change(known);
                    return None;
                }
            }
            let id = SessionId::generate();
            return match Box::pin(self.inner.shared.store.save(
                &id.storage_key(),
                Some(now_ms()),
                &state.changes,
                None,
                state.waited,
            ))
            .await
            {
                Saved::Written => Some(CookieUpdate::Set(id)),
                // Not created (the outage queue is full, or it expired at
                // once): no cookie, the next request starts afresh.
                Saved::Gone | Saved::Refused => None,
            };
        };
        if state.cycle {
            let mut merged = state.record.clone();
            state.changes.apply_to(&mut merged);
            let new_id = SessionId::generate();
            return match Box::pin(self.inner.shared.store.cycle(
                &id.storage_key(),
                &new_id.storage_key(),
                &merged,
                &state.changes,
                state.record.user.as_deref(),
                state.waited,
            ))
            .await
            {
                Saved::Written => Some(CookieUpdate::Set(new_id)),
                // Destroyed, revoked or cycled meanwhile: stays ended, and
                // the cookie is left alone (a concurrent login may have set
                // its successor).
                Saved::Gone => {
                    state.id = None;
                    None
                }
                // Kept its old id, unchanged (the outage queue is full).
                Saved::Refused => None,
            };
        }
        if state.changes.is_empty() {
            return None;
        }
        let previous_user = state.record.user.clone();
        match Box::pin(self.inner.shared.store.save(
            &id.storage_key(),
            None,
            &state.changes,
            previous_user.as_deref(),
            state.waited,
        ))
        .await
        {
            Saved::Written | Saved::Refused => None,
            // Destroyed or cycled by a concurrent request: not resurrected,
            // and its cookie is left alone.
            Saved::Gone => {
                state.id = None;
                None
            }
        }
    }

    /// The id of a session the handler loaded (so a persistent cookie's
    /// `Max-Age` can be renewed), unless it has ended meanwhile as far as
    /// this instance knows: a concurrent login may have set its successor.
    pub(crate) async fn live_id(&self) -> Option<SessionId> {
        let state = self.inner.state.lock().await;
        self.live_id_in(&state)
    }

    fn live_id_in(&self, state: &State) -> Option<SessionId> {
        if state.phase != Phase::Loaded {
            return None;
        }
        state.id.filter(|id| {
            !self
                .inner
                .shared
                .store
                .ended_since(&id.storage_key(), state.ends_mark)
        })
    }
}

fn serde_error(key: &str, source: serde_json::Error) -> SessionError {
    SessionError::Serde {
        key: key.to_owned(),
        source,
    }
}

/// Says that a change was not stored because its session's id was cycled
/// away by another request ([`Known::Held`]), or may have been: this instance's
/// memory of ends forgot an end since the request began (a flood of logins
/// and logouts). The second drops a change that may have been the user's
/// own, so it is a warning, counted apart:
/// `tower_redis_session_dropped_changes_total{reason="cycled" | "ends_forgotten"}`.
fn dropped_change(known: Known) {
    let reason = if known == Known::Held {
        tracing::debug!(
            target: "tower_redis_session",
            "a change to a session whose id another request cycled away is not stored"
        );
        "cycled"
    } else {
        tracing::warn!(
            target: "tower_redis_session",
            "a change to a session no longer in Redis is not stored: more sessions ended \
             while the request ran than this instance remembers (a flood of logins and \
             logouts), so a concurrent login may have cycled its id away"
        );
        "ends_forgotten"
    };
    tower_redis_core::record::counter(
        "tower_redis_session_dropped_changes_total",
        &[("reason", reason)],
        1,
    );
}
