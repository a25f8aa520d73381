//! [`Cache`]: look up, serve or forward, and store what may be stored.
//!
//! One file per decision:
//! - `mod.rs`: the service, and the dispatch of a request (unsafe method,
//!   not handled, hit, miss);
//! - `request.rs`: what a request may ask of the cache;
//! - `hit.rs`: an entry was found: serve it, serve it stale while
//!   refreshing, or revalidate it;
//! - `miss.rs`: nothing usable was found: coalesce, forward, fill
//!   (`coalesce.rs`: the in-process flights);
//! - `revalidate.rs`: conditional requests for stale entries, coalesced;
//! - `storing.rs`: whether and how a response is stored (`tee.rs`: its body
//!   read at the origin's pace);
//! - `invalidate.rs`: unsafe methods invalidate what they change;
//! - `range.rs`: a range request is answered with a range of the whole
//!   response; `partial.rs`: partial entries (stored `206`s), served,
//!   completed and combined;
//! - `cache_status.rs`, `tags.rs`: pure helpers;
//! - `future.rs`: the service's future, boxed, or an answer had at once.

mod cache_status;
pub(crate) mod coalesce;
mod future;
mod hit;
mod invalidate;
mod miss;
mod partial;
mod range;
mod request;
mod revalidate;
mod storing;
mod tags;
mod tee;
#[cfg(test)]
mod tests;

use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use tower_redis_core::http::is_grpc;
use tower_service::Service;

use crate::body::CacheBody;
use crate::directives::RequestDirectives;
use crate::key;
use crate::layer::Config;
use crate::store::{Found, Lookup, Tier};
use hit::Asked;

pub(crate) use cache_status::CACHE_STATUS;
pub(crate) use coalesce::Flights;
pub use future::ResponseFuture;
pub(crate) use range::storable_partial;
pub use request::RequestCacheControl;
pub(crate) use tee::TeeReader;

/// The cached service produced by [`CacheLayer`](crate::CacheLayer).
#[derive(Clone)]
pub struct Cache<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> std::fmt::Debug for Cache<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").finish_non_exhaustive()
    }
}

impl<S> Cache<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        Self { inner, config }
    }
}

/// The service the cache wraps, with the bounds every path needs (it is
/// called from spawned refreshes, so it is `Send + 'static`).
pub(crate) trait Origin<ReqBody, ResBody>:
    Service<Request<ReqBody>, Response = Response<ResBody>, Future: Send, Error: Send + 'static>
    + Send
    + 'static
{
}

impl<T, ReqBody, ResBody> Origin<ReqBody, ResBody> for T where
    T: Service<Request<ReqBody>, Response = Response<ResBody>, Future: Send, Error: Send + 'static>
        + Send
        + 'static
{
}

/// A response body the cache can read (to store it) on a task of its own.
pub(crate) trait OriginBody: Body<Data = Bytes, Error: Send> + Send + 'static {}

impl<B> OriginBody for B where B: Body<Data = Bytes, Error: Send> + Send + 'static {}

/// What every path answers.
pub(crate) type Answer<B, E> = Result<Response<CacheBody<B>>, E>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Cache<S>
where
    // The `Service` bound names `ResBody`; `Origin` adds what every path needs.
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Origin<ReqBody, ResBody> + Clone,
    ReqBody: Body + Send + 'static,
    ResBody: OriginBody,
{
    type Response = Response<CacheBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let config = Arc::clone(&self.config);
        let span = tracing::debug_span!(
            target: "tower_redis_cache",
            "cache",
            method = %request.method(),
            path = request.uri().path(),
            result = tracing::field::Empty,
            cache_status = tracing::field::Empty,
        );
        // The latency the cache adds (metrics only): the inner service's
        // time is counted through `Timed`, recorded when `clock` drops.
        #[cfg(feature = "metrics")]
        let clock = Arc::new(tower_redis_core::record::LayerClock::start("cache"));
        #[cfg(feature = "metrics")]
        let timing = Arc::downgrade(&clock);
        // The readied service, for a future that may call it: taken only
        // by such a future (a near hit, answered here, takes none, and so
        // does not clone the inner service).
        let service = &mut self.inner;
        let inner = move || {
            let clone = service.clone();
            let inner = std::mem::replace(service, clone);
            #[cfg(feature = "metrics")]
            let inner = Timed {
                inner,
                clock: timing,
            };
            inner
        };
        // Parsed and keyed now, inside the span as the rest: `handle` runs
        // with it entered, and leaves it when it boxes what is awaited (or
        // returns an answer).
        let finish = Finish {
            span: span.entered(),
            #[cfg(feature = "metrics")]
            clock,
        };
        handle(config, inner, request, finish)
    }
}

/// What the future of a request that awaits needs around it: the request's
/// span (entered while the request is parsed and keyed), and (metrics) the
/// clock of the cache's own latency.
struct Finish {
    span: tracing::span::EnteredSpan,
    #[cfg(feature = "metrics")]
    clock: Arc<tower_redis_core::record::LayerClock>,
}

impl Finish {
    /// The service's future for `later`: instrumented, timed, boxed.
    ///
    /// Boxed where it is made, so that what [`handle`] returns is small: a
    /// near hit returned the whole unboxed future of the slow path (about a
    /// kilobyte) through each caller, copied at each step.
    fn boxed<F, T, E>(self, later: F) -> ResponseFuture<T, E>
    where
        F: Future<Output = Result<T, E>> + Send + 'static,
    {
        #[cfg(feature = "metrics")]
        let later = {
            let clock = self.clock;
            futures_util::FutureExt::map(later, move |answer| {
                drop(clock);
                answer
            })
        };
        let later = tower_redis_core::in_span(self.span.exit(), later);
        #[cfg(test)]
        LAST_BOXED_BYTES.set(std::mem::size_of_val(&later));
        ResponseFuture::new(later)
    }
}

/// The inner service, its time counted as not the cache's own
/// ([`LayerClock::inner`](tower_redis_core::record::LayerClock::inner)).
/// A call made after the request's answer (a background refresh) is not
/// counted: the clock is gone by then.
#[cfg(feature = "metrics")]
struct Timed<S> {
    inner: S,
    clock: std::sync::Weak<tower_redis_core::record::LayerClock>,
}

#[cfg(feature = "metrics")]
impl<S, R> Service<R> for Timed<S>
where
    S: Service<R, Future: Send + 'static>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let called = self.inner.call(request);
        // The clock lives until the call is ready.
        match self.clock.upgrade() {
            Some(clock) => Box::pin(tower_redis_core::record::LayerClock::time_inner(
                clock, called,
            )),
            None => Box::pin(called),
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Near hits this thread answered when the service was called.
    pub(crate) static ANSWERED_AT_ONCE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// The size of the last future [`Finish::boxed`] boxed on this thread.
    pub(crate) static LAST_BOXED_BYTES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Parse, decide, and either answer from the cache or forward.
///
/// A plain function: the request is parsed and keyed here, when the
/// service is called, and the returned future holds only what the lookup
/// and the answer need. The miss, revalidation and invalidation paths are
/// boxed. As an `async fn` it held its arguments twice, and the request's
/// parts both before and after they were moved into the exchange, in the
/// future boxed for every request (hits included).
///
/// A fresh entry in the near tier is served here, with no copy of the
/// request's head, no future and no clone of the inner service (`inner`
/// hands it out, to the paths that may call it): the lookup an `await`
/// would make finds the same entry, and it would be served the same way.
fn handle<S, ReqBody, ResBody>(
    config: Arc<Config>,
    inner: impl FnOnce() -> S,
    mut request: Request<ReqBody>,
    finish: Finish,
) -> ResponseFuture<Response<CacheBody<ResBody>>, S::Error>
where
    S: Origin<ReqBody, ResBody>,
    ReqBody: Body + Send + 'static,
    ResBody: OriginBody,
{
    use futures_util::FutureExt as _;
    use futures_util::future::Either;
    if is_unsafe(request.method()) {
        let inner = inner();
        return finish
            .boxed(async move { invalidate::invalidating(&config, inner, request).await });
    }
    let Some(key_and_copy) = Key::of(&config, &request) else {
        return finish.boxed(
            inner()
                .call(request)
                .map(move |response| response.map(|response| passthrough(&config, response))),
        );
    };
    let key = &key_and_copy.0;
    // A range request takes the path below, which cuts its range.
    let near = if range::asked(request.headers()) {
        None
    } else {
        config
            .store
            .find_near(&key.url_hash, request.headers(), &key.extra)
    };
    let near_read = near.is_some();
    let found = match near {
        Some((Found::Entry(entry), stored)) => {
            match hit::serve_fresh(
                &config,
                entry,
                stored,
                Tier::Near,
                &key.directives,
                Asked::of(&request),
            ) {
                Ok(response) => {
                    #[cfg(test)]
                    ANSWERED_AT_ONCE.set(ANSWERED_AT_ONCE.get() + 1);
                    return ResponseFuture::ready(Ok(response));
                }
                // Boxed: the future of every lookup would hold it.
                Err((entry, _)) => Some(Box::new(entry)),
            }
        }
        _ => None,
    };
    // The origin is asked for the whole response (unless the range is
    // forwarded: `forward_ranges`, or a stored partial entry); a range is
    // cut from a whole answer, whichever path gives it.
    let range = range::take(&mut request);
    let exchange = Exchange::keyed(config, key_and_copy, inner(), request);
    finish.boxed(async move {
        let wanted = range.as_ref();
        // The next step is picked in a block, so that what the lookup
        // found is not kept in this future while the step runs.
        let next = {
            let ctx = &exchange.ctx;
            // Boxed apart, as its Redis read is: together with the exchange
            // they would make a box larger than the allocator's per-thread
            // cache takes (1,032 bytes), and each such box goes to the
            // shared arena under its lock.
            let (lookup, tier) = match found {
                // An entry of the near tier that is not served as it is.
                Some(entry) => (Lookup::Hit(*entry), Tier::Near),
                None => {
                    Box::pin(ctx.config.store.lookup_after(
                        &ctx.keyed.key.url_hash,
                        &ctx.keyed.parts.headers,
                        &ctx.keyed.key.extra,
                        near_read,
                        false,
                    ))
                    .await
                }
            };
            match lookup {
                Lookup::Hit(entry) => Either::Left(exchange.on_hit(entry, tier, wanted)),
                Lookup::UriMiss => Either::Right(exchange.on_miss("uri-miss", tier, wanted)),
                Lookup::VaryMiss => Either::Right(exchange.on_miss("vary-miss", tier, wanted)),
            }
        };
        let answer = next.await;
        match range {
            Some(wanted) => answer.map(|response| range::answer(&wanted, response)),
            None => answer,
        }
    })
}

/// Where a request's entries live and what it asks of the cache, read
/// from the request in place.
pub(crate) struct Key {
    /// `//host/path?query`.
    pub(crate) url: std::sync::Arc<str>,
    pub(crate) url_hash: std::sync::Arc<str>,
    pub(crate) extra: String,
    pub(crate) directives: RequestDirectives,
}

/// A [`Key`], and the copy of the request's head keying made when it
/// needed one: a request from a trusted proxy (marked as such), a route
/// with a key function (which is given `Parts`).
type KeyAndCopy = (Key, Option<Parts>);

impl Key {
    /// The key of a request the cache handles, or `None` for one it passes
    /// through: not a GET or HEAD, gRPC, a body, a route that
    /// bypasses the cache, an unknown host or a malformed forwarded origin.
    fn of<B: Body>(config: &Config, request: &Request<B>) -> Option<KeyAndCopy> {
        let method = request.method();
        let cacheable_request =
            (method == Method::GET || method == Method::HEAD) && !request::carries_body(request);
        if cacheable_request {
            Self::of_target(config, request)
        } else {
            None
        }
    }

    /// The key of the URL a request targets, whatever its method: `None`
    /// for gRPC, a route that bypasses the cache, an unknown host or a
    /// malformed forwarded origin.
    fn of_target<B>(config: &Config, request: &Request<B>) -> Option<KeyAndCopy> {
        let route = config.route_for(request.uri().path());
        if is_grpc(request.headers()) || !route.enabled {
            return None;
        }
        let forwarded = request::forwarded_origin(config, request).ok()?;
        let (url, url_hash, extra, copied) = if forwarded.is_none() && route.key_fn.is_none() {
            let (url, url_hash) = key::url_and_hash(config, request)?;
            (url, url_hash, key::extra_key(request, route)?, None)
        } else {
            let mut parts = head_only(request).0;
            let url = match &forwarded {
                Some((family, view)) => {
                    parts.extensions.insert(request::ViaTrustedProxy(*family));
                    key::forwarded_url_of(&parts, view, &config.allowed_hosts, route)
                }
                None => key::url_of(&parts, &config.allowed_hosts, route),
            }?;
            let mut extra = key::extra_key(&parts, route)?;
            if let Some((_, view)) = &forwarded {
                key::push_forwarded_origin(&mut extra, view, &parts);
            }
            let url_hash = key::hash_url(&url);
            (url.into(), url_hash.into(), extra, Some(parts))
        };
        let key = Key {
            url_hash,
            url,
            extra,
            directives: request::directives(request.headers(), config.request_cache_control),
        };
        Some((key, copied))
    }
}

/// A request the cache handles: its head (as the client sent it), where its
/// entries live and what it asks of the cache.
pub(crate) struct Keyed {
    pub(crate) parts: Parts,
    pub(crate) key: Key,
}

impl Keyed {
    /// [`Key::of_target`], with the request's head.
    pub(super) fn of_target<B>(config: &Config, request: &Request<B>) -> Option<Self> {
        Key::of_target(config, request).map(|found| Self::with_head(found, request))
    }

    /// A key with the request's head: the copy keying made, or one made
    /// now.
    fn with_head<B>((key, copied): KeyAndCopy, request: &Request<B>) -> Self {
        Self {
            parts: copied.unwrap_or_else(|| head_only(request).0),
            key,
        }
    }

    /// The key requests are coalesced on: the URL and the route's extra
    /// key parts (the `Vary` of the response is not known yet).
    /// Borrowed when there are no extra parts: a miss only looks it up.
    pub(crate) fn flight_key(&self) -> std::borrow::Cow<'_, str> {
        let key = &self.key;
        if key.extra.is_empty() {
            std::borrow::Cow::Borrowed(&key.url_hash)
        } else {
            std::borrow::Cow::Owned(format!(
                "{}:{}",
                key.url_hash,
                key::value_digest(&key.extra)
            ))
        }
    }
}

/// What every decision about one keyed request needs, once the request
/// itself has gone to the origin: the layer's configuration and the key.
pub(crate) struct Ctx {
    pub(crate) config: Arc<Config>,
    pub(crate) keyed: Keyed,
}

/// A keyed request on its way: its context, the service to forward it to
/// and the request itself. The decisions (`hit.rs`, `miss.rs`,
/// `revalidate.rs`) are its methods, under one set of bounds.
pub(crate) struct Exchange<S, ReqBody, ResBody> {
    pub(crate) ctx: Ctx,
    pub(crate) inner: S,
    /// The request for the origin ([`request_mut`](Self::request_mut)).
    request: Request<ReqBody>,
    /// Whether `request` has only the body yet, its head being the
    /// context's (`ctx.keyed.parts`) until the request is forwarded.
    head_in_ctx: bool,
    /// The origin's body type, which the methods' bounds name.
    body: PhantomData<fn() -> ResBody>,
}

impl<S, ReqBody, ResBody> Exchange<S, ReqBody, ResBody> {
    /// A keyed request on its way (its range already taken). The context
    /// holds the copy of the head keying made, or else the request's own
    /// head: the origin's copy is made only if the request is forwarded
    /// (a hit makes none).
    fn keyed(
        config: Arc<Config>,
        (key, copied): KeyAndCopy,
        inner: S,
        request: Request<ReqBody>,
    ) -> Self {
        let (parts, request, head_in_ctx) = match copied {
            Some(mut parts) => {
                range::strip(&mut parts.headers);
                (parts, request, false)
            }
            None => {
                let (parts, body) = request.into_parts();
                (parts, Request::new(body), true)
            }
        };
        Self {
            ctx: Ctx {
                config,
                keyed: Keyed { parts, key },
            },
            inner,
            request,
            head_in_ctx,
            body: PhantomData,
        }
    }

    /// The request for the origin. Where the context holds the request's
    /// own head, the origin's request gets a copy of it now, and its
    /// extensions (the context's head keeps none, as a copy made when the
    /// request was keyed).
    pub(crate) fn request_mut(&mut self) -> &mut Request<ReqBody> {
        if std::mem::take(&mut self.head_in_ctx) {
            let head = &mut self.ctx.keyed.parts;
            let request = &mut self.request;
            *request.method_mut() = head.method.clone();
            *request.uri_mut() = head.uri.clone();
            *request.version_mut() = head.version;
            *request.headers_mut() = head.headers.clone();
            *request.extensions_mut() = std::mem::take(&mut head.extensions);
        }
        &mut self.request
    }

    /// The context, the inner service and the request for the origin.
    pub(crate) fn into_parts(mut self) -> (Ctx, S, Request<ReqBody>) {
        self.request_mut();
        (self.ctx, self.inner, self.request)
    }
}

/// A response the cache does not handle: only its tag headers are removed.
fn passthrough<B: Body>(config: &Config, response: Response<B>) -> Response<CacheBody<B>> {
    let (mut parts, body) = response.into_parts();
    if config.strip_tag_headers {
        for name in &config.tag_headers {
            parts.headers.remove(name);
        }
    }
    Response::from_parts(parts, CacheBody::passthrough(body))
}

/// The field value this thread last made from `input`, or the one `make`
/// makes now (remembered in its place): a hot URL's hits answer the same
/// `Age` and `Cache-Status` many times a second, and share one value
/// instead of each allocating and checking another. While the thread ends
/// (its locals gone), `make`'s value, not remembered.
fn remembered<K: PartialEq + Clone>(
    last: &'static std::thread::LocalKey<std::cell::RefCell<Option<(K, http::HeaderValue)>>>,
    input: &K,
    make: impl Fn() -> Option<http::HeaderValue>,
) -> Option<http::HeaderValue> {
    last.try_with(|last| {
        let mut last = last.borrow_mut();
        if let Some((made_for, value)) = &*last
            && made_for == input
        {
            return Some(value.clone());
        }
        let value = make()?;
        *last = Some((input.clone(), value.clone()));
        Some(value)
    })
    .unwrap_or_else(|_| make())
}

/// RFC 9111 §4.4: unsafe methods, including those whose safety is unknown.
fn is_unsafe(method: &Method) -> bool {
    !method.is_safe()
}

/// The request's head, without its body.
fn head_only<B>(request: &Request<B>) -> (Parts, ()) {
    // Set field by field: a `Request::builder()` moves the whole head
    // through each of its calls.
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = request.method().clone();
    parts.uri = request.uri().clone();
    parts.version = request.version();
    parts.headers = request.headers().clone();
    (parts, ())
}

fn response_parts(status: StatusCode, headers: HeaderMap) -> http::response::Parts {
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = status;
    parts.headers = headers;
    parts
}
