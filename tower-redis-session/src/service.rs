//! [`SessionService`]: puts a [`Session`] in the request, writes it after
//! the handler, and sets the cookie.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderValue, Request, Response, header};
use tower_redis_core::record::{InnerStarted, LayerClock};
use tower_service::Service;

use crate::id::{CookieCodec, SessionId};
use crate::layer::Shared;
use crate::session::{CookieUpdate, Session};

/// A `name=value` pair longer than this is not a session cookie (ids are a
/// few dozen bytes, signed ones about a hundred) and is skipped unread. The
/// whole line is still searched, however long another cookie makes it, so
/// a neighbour's large cookie cannot hide the session; its length is
/// bounded by the server's header limit, and the search is one pass.
const MAX_SESSION_PAIR: usize = 1024;

/// The service produced by [`SessionLayer`](crate::SessionLayer).
#[derive(Clone, Debug)]
pub struct SessionService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> SessionService<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`SessionService`].
    ///
    /// The wrapped service's call, then the session's end: for a request
    /// that changed nothing (the session untouched or only read), worked
    /// out in place, with nothing allocated for it; for one that writes or
    /// deletes, a boxed future of the write. The request's span is entered
    /// while either runs, and while either is dropped (a request
    /// cancelled). It is `Send` when the wrapped service's future is, and
    /// `Unpin` when that future is.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        state: State<F, B, E>,
        span: tracing::Span,
    }
    impl<F, B, E> PinnedDrop for ResponseFuture<F, B, E> {
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            let _entered = this.span.enter();
            this.state.set(State::Done);
        }
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F, B, E> {
        /// The inner call, then the session's end.
        Called {
            #[pin]
            called: F,
            then: Option<Then>,
        },
        /// The session's write, then the response.
        Writing { future: tower_redis_core::ResponseFuture<Response<B>, E> },
        /// Answered (or being dropped).
        Done,
    }
}

/// What the response future needs once the inner call is ready (the
/// layer's settings are the session's).
struct Then {
    session: Session,
    clock: LayerClock,
    started: InnerStarted,
}

impl<F, B, E> std::future::Future for ResponseFuture<F, B, E>
where
    F: std::future::Future<Output = Result<Response<B>, E>>,
    B: Send + 'static,
    E: 'static,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // The request's span, as the inner service's and the write's parent.
        let _entered = this.span.enter();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { called, then } => {
                    let answer = std::task::ready!(called.poll(cx));
                    let Some(Then {
                        session,
                        clock,
                        started,
                    }) = then.take()
                    else {
                        unreachable!("the inner call is polled until it is ready, then left")
                    };
                    clock.inner_ended(started);
                    let mut response = match answer {
                        Ok(response) => response,
                        Err(error) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error));
                        }
                    };
                    let shared = session.shared();
                    if let Some(update) = session.finish_now(shared.expiry.persistent) {
                        apply(shared, update, &mut response);
                        // The clock stops (is dropped) here, after the cookie.
                        drop(clock);
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response));
                    }
                    let shared = Arc::clone(shared);
                    let future = tower_redis_core::ResponseFuture::new(async move {
                        let update = match session.finish().await {
                            Some(update) => Some(update),
                            // A persistent cookie's Max-Age rolls with use.
                            None if shared.expiry.persistent => {
                                session.live_id().await.map(CookieUpdate::Set)
                            }
                            None => None,
                        };
                        apply(&shared, update, &mut response);
                        drop(clock);
                        Ok(response)
                    });
                    #[cfg(test)]
                    tests::WRITES.with(|writes| writes.set(writes.get() + 1));
                    this.state.set(State::Writing { future });
                }
                StateProj::Writing { future } => {
                    let answer = std::task::ready!(Pin::new(future).poll(cx));
                    this.state.set(State::Done);
                    return Poll::Ready(answer);
                }
                StateProj::Done => panic!("ResponseFuture polled after it completed"),
            }
        }
    }
}

impl<F, B, E> std::fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SessionService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let cookie_id = session_cookie(request.headers(), &self.shared);
        let had_cookie = cookie_id.is_some();
        let session = Session::new(Arc::clone(&self.shared), cookie_id);
        request.extensions_mut().insert(session.clone());
        // One span per request: the store records `loaded` (found, missing),
        // `saved` (created, saved, cycled, deleted) and `save_result`.
        let span = tracing::debug_span!(
            target: "tower_redis_session",
            "session",
            cookie = had_cookie,
            loaded = tracing::field::Empty,
            saved = tracing::field::Empty,
            save_result = tracing::field::Empty,
        );
        // Called here, on the service `poll_ready` readied (nothing to
        // await first: the session loads when the handler asks), so the
        // inner service is not cloned for every request.
        let called = {
            // Inside the request's span, as the future polls it: a span the
            // inner service makes in `call` is its child.
            let _entered = span.enter();
            self.inner.call(request)
        };
        // The latency this layer adds (metrics only); recorded when dropped.
        // The inner service's call and future are not the layer's.
        let clock = LayerClock::start("session");
        let started = clock.inner_started();
        ResponseFuture {
            state: State::Called {
                called,
                then: Some(Then {
                    session,
                    clock,
                    started,
                }),
            },
            span,
        }
    }
}

/// Sets the session cookie the request's end asks for, if any.
fn apply<B>(shared: &Shared, update: Option<CookieUpdate>, response: &mut Response<B>) {
    if let Some(update) = update
        && let Ok(value) = HeaderValue::from_str(&set_cookie(shared, &update))
    {
        let headers = response.headers_mut();
        headers.append(header::SET_COOKIE, value);
        // A response carrying a session id must not be cached.
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}

/// The id in the request's session cookie, if there is a valid one.
fn session_cookie(headers: &HeaderMap, shared: &Shared) -> Option<SessionId> {
    find_session_cookie(headers, &shared.cookie_name, &shared.codec)
}

/// The first valid session id among the `name` cookies of every `Cookie`
/// line.
///
/// Each line is split into its `name=value` pairs before anything is
/// decoded: other cookies on the same line are the browser's business and
/// may hold bytes that are not text (`pref=ü`), which must not hide the
/// session cookie next to them and log the user out.
pub(crate) fn find_session_cookie(
    headers: &HeaderMap,
    name: &str,
    codec: &CookieCodec,
) -> Option<SessionId> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|line| line.as_bytes().split(|byte| *byte == b';'))
        .filter(|pair| pair.len() <= MAX_SESSION_PAIR)
        .filter_map(|pair| {
            let at = pair.iter().position(|byte| *byte == b'=')?;
            let (pair_name, value) = (pair[..at].trim_ascii_start(), &pair[at + 1..]);
            (pair_name == name.as_bytes()).then_some(value)
        })
        .filter_map(|value| std::str::from_utf8(value.trim_ascii()).ok())
        .find_map(|value| codec.decode(value.trim_matches('"')))
}

fn set_cookie(shared: &Shared, update: &CookieUpdate) -> String {
    let config = &shared.cookie;
    let value = match update {
        CookieUpdate::Set(id) => shared.codec.encode(id),
        CookieUpdate::Remove => String::new(),
    };
    let mut cookie = cookie::Cookie::build((shared.cookie_name.clone(), value))
        .path(config.path.clone())
        .secure(config.secure)
        .http_only(config.http_only)
        .same_site(config.same_site);
    if let Some(domain) = &config.domain {
        cookie = cookie.domain(domain.clone());
    }
    match update {
        CookieUpdate::Remove => cookie = cookie.max_age(cookie::time::Duration::ZERO),
        CookieUpdate::Set(_) if shared.expiry.persistent => {
            let seconds = i64::try_from(shared.expiry.idle.as_secs()).unwrap_or(i64::MAX);
            cookie = cookie.max_age(cookie::time::Duration::seconds(seconds));
        }
        CookieUpdate::Set(_) => {}
    }
    cookie.build().to_string()
}

/// The service's decisions, in process: the manager has no Redis, so every
/// store operation is the local one, and no test needs a server.
#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::{Request, Response, StatusCode, header};
    use tower::{Layer, ServiceExt};
    use tower_redis_core::RedisManager;

    use crate::{Session, SessionLayer, SessionLayerBuilder};

    thread_local! {
        /// How many requests on this thread had their session's end in a
        /// future of its own (a write or a delete).
        pub(super) static WRITES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// What the handler does with the session, by path.
    async fn handler(request: Request<()>) -> Result<Response<String>, Infallible> {
        let session = request
            .extensions()
            .get::<Session>()
            .expect("the layer adds it")
            .clone();
        let body = match request.uri().path() {
            "/visit" => {
                let visits: u32 = session.get("visits").await.expect("json").unwrap_or(0) + 1;
                session.insert("visits", visits).await.expect("fits");
                visits.to_string()
            }
            "/read" => {
                let visits: Option<u32> = session.get("visits").await.expect("json");
                visits.map_or_else(|| "none".to_owned(), |v| v.to_string())
            }
            "/cycle" => {
                session.cycle_id().await;
                "cycled".to_owned()
            }
            "/logout" => {
                session.destroy().await;
                "bye".to_owned()
            }
            _ => "untouched".to_owned(),
        };
        Ok(Response::new(body))
    }

    struct App<S>(S);

    impl<S> App<S>
    where
        S: tower_service::Service<
                Request<()>,
                Response = Response<String>,
                Error = Infallible,
                Future: Send,
            > + Clone,
    {
        /// (status, body, Set-Cookie).
        async fn call(
            &self,
            path: &str,
            cookie: Option<&str>,
        ) -> (StatusCode, String, Option<String>) {
            let mut request = Request::builder().uri(path);
            if let Some(cookie) = cookie {
                request = request.header(header::COOKIE, cookie);
            }
            let response = self
                .0
                .clone()
                .oneshot(request.body(()).expect("request"))
                .await
                .expect("infallible");
            let set_cookie = response
                .headers()
                .get(header::SET_COOKIE)
                .map(|v| v.to_str().expect("text").to_owned());
            (response.status(), response.into_body(), set_cookie)
        }
    }

    fn app(
        configure: impl FnOnce(SessionLayerBuilder) -> SessionLayerBuilder,
    ) -> App<
        impl tower_service::Service<
            Request<()>,
            Response = Response<String>,
            Error = Infallible,
            Future: Send,
        > + Clone,
    > {
        let layer = configure(SessionLayer::builder(RedisManager::disabled()))
            .build()
            .expect("valid layer");
        App(layer.layer(tower::service_fn(handler)))
    }

    fn pair(set_cookie: &str) -> String {
        set_cookie.split(';').next().expect("pair").to_owned()
    }

    #[tokio::test]
    async fn a_request_that_does_not_use_the_session_gets_no_cookie() {
        let app = app(|b| b);
        let (status, body, cookie) = app.call("/other", None).await;
        assert_eq!(
            (status, body.as_str(), cookie),
            (StatusCode::OK, "untouched", None)
        );
        // Reading an empty session makes none either.
        assert_eq!(app.call("/read", None).await.2, None);
    }

    #[tokio::test]
    async fn a_session_with_data_gets_a_secure_host_only_cookie_and_keeps_its_data() {
        let app = app(|b| b);
        let (_, body, cookie) = app.call("/visit", None).await;
        assert_eq!(body, "1");
        let cookie = cookie.expect("a new session sets its cookie");
        for attribute in [
            "__Host-session=",
            "Secure",
            "HttpOnly",
            "SameSite=Lax",
            "Path=/",
        ] {
            assert!(cookie.contains(attribute), "{attribute} missing: {cookie}");
        }
        let pair = pair(&cookie);
        assert_eq!(app.call("/visit", Some(&pair)).await.1, "2");
        let (_, body, again) = app.call("/read", Some(&pair)).await;
        assert_eq!(
            (body.as_str(), again),
            ("2", None),
            "no cookie on a plain read"
        );
    }

    #[tokio::test]
    async fn a_cookie_the_server_never_issued_is_no_session() {
        let app = app(|b| b);
        let forged = format!("__Host-session={}", "A".repeat(43));
        let (_, body, cookie) = app.call("/visit", Some(&forged)).await;
        assert_eq!(body, "1", "the forged id's session is empty");
        let cookie = cookie.expect("a new session");
        assert_ne!(pair(&cookie), forged, "a client-chosen id is never adopted");
    }

    #[tokio::test]
    async fn cycling_the_id_moves_the_data_and_ends_the_old_id() {
        let app = app(|b| b);
        let old = pair(&app.call("/visit", None).await.2.expect("session"));
        let new = pair(&app.call("/cycle", Some(&old)).await.2.expect("a new id"));
        assert_ne!(old, new);
        assert_eq!(app.call("/read", Some(&new)).await.1, "1");
        assert_eq!(app.call("/read", Some(&old)).await.1, "none");
    }

    #[tokio::test]
    async fn destroying_the_session_removes_the_cookie_and_the_data() {
        let app = app(|b| b);
        let cookie = pair(&app.call("/visit", None).await.2.expect("session"));
        let (_, _, removal) = app.call("/logout", Some(&cookie)).await;
        let removal = removal.expect("a removal cookie");
        assert!(removal.contains("Max-Age=0"), "{removal}");
        assert_eq!(app.call("/read", Some(&cookie)).await.1, "none");
    }

    #[tokio::test]
    async fn the_development_opt_in_drops_secure_and_the_host_prefix() {
        let app = app(SessionLayerBuilder::insecure_http_for_local_development);
        let cookie = app.call("/visit", None).await.2.expect("session");
        assert!(cookie.starts_with("session="), "{cookie}");
        assert!(!cookie.contains("Secure"), "{cookie}");
    }

    /// The layer calls the inner service `poll_ready` readied, in `call`:
    /// it clones no inner service for a request (an axum route's clone is
    /// an allocation).
    #[tokio::test]
    async fn a_request_clones_no_inner_service() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tower::Service;

        struct Counted(Arc<AtomicUsize>);
        impl Clone for Counted {
            fn clone(&self) -> Self {
                self.0.fetch_add(1, Ordering::SeqCst);
                Self(Arc::clone(&self.0))
            }
        }
        impl Service<Request<()>> for Counted {
            type Response = Response<String>;
            type Error = Infallible;
            type Future = std::future::Ready<Result<Response<String>, Infallible>>;
            fn poll_ready(
                &mut self,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), Infallible>> {
                std::task::Poll::Ready(Ok(()))
            }
            fn call(&mut self, _: Request<()>) -> Self::Future {
                std::future::ready(Ok(Response::new("ok".to_owned())))
            }
        }

        let clones = Arc::new(AtomicUsize::new(0));
        let layer = SessionLayer::builder(RedisManager::disabled())
            .build()
            .expect("a layer");
        let mut service = layer.layer(Counted(Arc::clone(&clones)));
        for _ in 0..3 {
            let response = service
                .ready()
                .await
                .expect("ready")
                .call(Request::new(()))
                .await
                .expect("infallible");
            assert_eq!(response.into_body(), "ok");
        }
        assert_eq!(clones.load(Ordering::SeqCst), 0);
    }

    /// A request that changes nothing (the session untouched, only read,
    /// or a new one left empty) ends in place: its response future makes
    /// no future of its own for the session's end, persistent cookie
    /// renewal included. One that writes or deletes awaits the store in a
    /// future of its own, and its answers are those of every other test.
    #[tokio::test]
    async fn a_request_that_changes_nothing_ends_without_a_future_of_its_own() {
        use tower::Service;

        for persistent in [false, true] {
            let expiry = crate::Expiry {
                persistent,
                ..crate::Expiry::default()
            };
            let layer = SessionLayer::builder(RedisManager::disabled())
                .expiry(expiry)
                .build()
                .expect("a layer");
            let mut service = layer.layer(tower::service_fn(handler));
            let app = App(service.clone());
            let stored = pair(&app.call("/visit", None).await.2.expect("session"));
            let unknown = format!("__Host-session={}", "A".repeat(43));
            for (path, cookie, writes, sets_cookie) in [
                ("/other", None, false, false),
                ("/other", Some(stored.as_str()), false, false),
                ("/read", None, false, false),
                ("/read", Some(stored.as_str()), false, persistent),
                ("/visit", Some(stored.as_str()), true, persistent),
                ("/visit", None, true, true),
                ("/logout", Some(stored.as_str()), true, true),
                // Nothing stored to delete: the cookie is removed in place.
                ("/logout", Some(unknown.as_str()), false, true),
                // A new session's id cycled before it holds anything.
                ("/cycle", None, false, false),
            ] {
                let mut request = Request::builder().uri(path);
                if let Some(cookie) = cookie {
                    request = request.header(header::COOKIE, cookie);
                }
                let request = request.body(()).expect("request");
                let before = WRITES.with(std::cell::Cell::get);
                let response = service
                    .ready()
                    .await
                    .expect("ready")
                    .call(request)
                    .await
                    .expect("infallible");
                let wrote = WRITES.with(std::cell::Cell::get) > before;
                let context = format!("{path} with cookie {cookie:?}, persistent={persistent}");
                assert_eq!(wrote, writes, "a future of its own: {context}");
                assert_eq!(
                    response.headers().contains_key(header::SET_COOKIE),
                    sets_cookie,
                    "Set-Cookie: {context}"
                );
            }
        }
    }

    /// The layer's response future holds the wrapped call inline; an axum
    /// app boxes the whole, so around a route it must fit the allocator's
    /// per-thread cache (glibc's tcache takes blocks of up to 1,032 bytes).
    #[test]
    fn the_response_future_fits_the_allocators_thread_cache() {
        type AroundRouter = super::ResponseFuture<
            axum::routing::future::RouteFuture<Infallible>,
            axum::body::Body,
            Infallible,
        >;
        let size = std::mem::size_of::<AroundRouter>();
        assert!(size <= 1032, "the response future is {size} bytes");
    }

    /// A session read's future (part of the handler's future, which the
    /// app boxes) and the store's load, which the read boxes apart, each
    /// fit the allocator's per-thread cache (glibc's tcache takes blocks of
    /// up to 1,032 bytes; a larger one comes from the shared arena, under
    /// its lock). The read was 1,288 bytes in a release build, the load
    /// inlined in it. The sizes are this build's layout (a test build's,
    /// larger than a release build's).
    #[test]
    fn a_session_reads_futures_fit_the_allocators_thread_cache() {
        let layer = SessionLayer::builder(RedisManager::disabled())
            .build()
            .expect("a layer");
        let store = layer.shared.store.clone();
        let id = crate::id::SessionId::generate();
        let session = Session::new(std::sync::Arc::clone(&layer.shared), Some(id));
        let read = session.get::<u32>("visits");
        let size = std::mem::size_of_val(&read);
        assert!(size <= 1032, "a session read is {size} bytes");
        let key = id.storage_key();
        let Err(later) = store.load_now(&key) else {
            panic!("nothing is tracked without Redis");
        };
        let load = store.load_later(&key, later);
        let size = std::mem::size_of_val(&load);
        assert!(size <= 1032, "the boxed load is {size} bytes");
    }
}
