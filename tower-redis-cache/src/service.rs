//! [`Cache`]: look up, serve or forward, and store what may be stored.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::BodyExt;
use tower_service::Service;
use tracing::Instrument;

use crate::body::CacheBody;
use crate::coalesce::{self, FlightGuard, Joined, Outcome};
use crate::directives::RequestDirectives;
use crate::entry::Entry;
use crate::freshness::{self, Usability};
use crate::key;
use crate::layer::Config;
use crate::request;
use crate::revalidation;
use crate::store::{LockAttempt, LockPurpose, LockToken, Lookup, Put, Tier};
use crate::storing::{
    HOP_BY_HOP, STORED_TAGS, keep_for, set_stored_tags, store_if_allowed, stored_tags, take_tags,
};

/// The `Cache-Status` field (RFC 9211).
pub(crate) static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
const CACHE_NAME: &str = "tower-redis";

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

pub use tower_redis_core::ResponseFuture;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Cache<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqBody: Body + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    type Response = Response<CacheBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let config = Arc::clone(&self.config);
        let span = tracing::debug_span!(
            target: "tower_redis_cache",
            "cache",
            method = %request.method(),
            path = request.uri().path()
        );
        ResponseFuture::new(handle(config, inner, request).instrument(span))
    }
}

/// Parse, decide, and either answer from the cache or forward.
async fn handle<S, ReqBody, ResBody>(
    config: Arc<Config>,
    mut inner: S,
    request: Request<ReqBody>,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqBody: Body + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    let method = request.method().clone();
    // The miss, revalidation and invalidation paths are boxed: inlined,
    // they made this future (moved and allocated on every request, hits
    // included) about twice as large.
    if is_unsafe(&method) {
        return Box::pin(invalidating(&config, inner, request)).await;
    }
    let cacheable_request = (method == Method::GET || method == Method::HEAD)
        && !is_grpc(request.headers())
        && !request.headers().contains_key(header::RANGE)
        && !request::carries_body(&request);
    let route = config.route_for(request.uri().path());
    // The request's head is copied once, and only for requests the cache handles.
    let keyed = (cacheable_request && route.enabled)
        .then(|| request::forwarded_origin(&config, &request).ok())
        .flatten()
        .and_then(|forwarded| {
            let mut parts = head_only(&request).0;
            let url = match &forwarded {
                Some((family, view)) => {
                    parts.extensions.insert(request::ViaTrustedProxy(*family));
                    key::forwarded_url_of(&parts, view, &config.allowed_hosts, route)
                }
                None => key::url_of(&parts, &config.allowed_hosts, route),
            }?;
            let mut extra = key::extra_key(&parts, route);
            if let Some((_, view)) = &forwarded {
                key::push_forwarded_origin(&mut extra, view, &parts);
            }
            Some((parts, url, extra))
        });
    let Some((parts, url, extra)) = keyed else {
        let response = inner.call(request).await?;
        return Ok(passthrough(&config, response));
    };

    let keyed = Keyed {
        url_hash: key::hash_url(&url),
        url,
        extra,
        directives: request::directives(&parts.headers, config.request_cache_control),
        parts,
    };
    let (lookup, tier) = config
        .store
        .lookup(&keyed.url_hash, &keyed.parts.headers, &keyed.extra)
        .await;
    let forward_reason = match lookup {
        Lookup::Hit(entry) => return on_hit(config, inner, request, entry, keyed, tier).await,
        Lookup::UriMiss => "uri-miss",
        Lookup::VaryMiss => "vary-miss",
    };
    config.store.counters.misses.fetch_add(1, Ordering::Relaxed);
    if keyed.directives.only_if_cached {
        return Ok(gateway_timeout(tier));
    }
    let status = CacheStatus::forward(forward_reason, tier);
    let Some(max_wait) = coalescing(&config, &keyed) else {
        return Box::pin(forward_and_store(
            &config,
            inner,
            request,
            &keyed,
            status,
            Fill::none(),
        ))
        .await;
    };
    Box::pin(coalesced_miss(
        &config, inner, request, &keyed, status, max_wait,
    ))
    .await
}

/// How long requests may wait for a fill or a revalidation another request
/// makes for them, when they may be coalesced at all: GET only, and not on
/// a URL whose last coalesced answer was not storable.
pub(crate) fn coalescing(config: &Config, keyed: &Keyed) -> Option<Duration> {
    config
        .coalesce
        .filter(|_| keyed.parts.method == Method::GET)
        .filter(|_| !config.uncacheable.contains_key(&keyed.flight_key()))
}

/// A request the cache handles: its head (as the client sent it), where its
/// entries live and what it asks of the cache.
pub(crate) struct Keyed {
    pub(crate) parts: Parts,
    /// `//host/path?query`.
    pub(crate) url: String,
    pub(crate) url_hash: String,
    pub(crate) extra: String,
    pub(crate) directives: RequestDirectives,
}

impl Keyed {
    /// The key requests are coalesced on: the URL and the route's extra
    /// key parts (the `Vary` of the response is not known yet).
    pub(crate) fn flight_key(&self) -> String {
        if self.extra.is_empty() {
            self.url_hash.clone()
        } else {
            format!("{}:{}", self.url_hash, key::value_digest(&self.extra))
        }
    }
}

/// What a request that fills an entry holds: its in-process flight (the
/// followers waiting for it) and the Redis fill lock, both released once
/// the entry is stored or given up.
pub(crate) struct Fill {
    pub(crate) guard: Option<FlightGuard>,
    pub(crate) lock: Option<LockToken>,
}

impl Fill {
    pub(crate) fn none() -> Self {
        Self {
            guard: None,
            lock: None,
        }
    }

    /// Gives up because the origin failed (an error, or `status`): the
    /// in-process followers hear so at once, then the lock is released.
    fn fail(mut self, config: &Arc<Config>, url_hash: &str, status: Option<StatusCode>) {
        if let Some(guard) = self.guard.take() {
            guard.fail(status);
        }
        self.release(config, url_hash);
    }

    /// Gives up without an entry: releases the lock (waking the other
    /// instances' waiters) and ends the flight.
    pub(crate) fn release(self, config: &Arc<Config>, url_hash: &str) {
        if let Some(lock) = self.lock {
            let store = Arc::clone(&config.store);
            let url_hash = url_hash.to_owned();
            let guard = self.guard;
            let in_flight = config.store.start_store();
            tokio::spawn(async move {
                store.unlock(lock, &url_hash).await;
                drop(guard);
                drop(in_flight);
            });
        }
    }
}

/// A stored entry was found: serve it, serve it stale while refreshing it
/// in the background, or revalidate it.
async fn on_hit<S, ReqBody, ResBody>(
    config: Arc<Config>,
    inner: S,
    request: Request<ReqBody>,
    entry: Entry,
    keyed: Keyed,
    tier: Tier,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    let now_ms = freshness::epoch_ms(SystemTime::now());
    let age = entry.age(now_ms);
    let stored = freshness::directives_of(&entry.headers, &config.rules);
    let request_directives = &keyed.directives;
    match freshness::usability(age, entry.lifetime, &stored, request_directives) {
        Usability::Fresh | Usability::StaleAccepted => {
            config.store.counters.hits.fetch_add(1, Ordering::Relaxed);
            let status = CacheStatus::hit(entry.ttl(now_ms), tier);
            Ok(serve(&entry, &keyed.parts, age, status))
        }
        Usability::Revalidate if request_directives.only_if_cached => Ok(gateway_timeout(tier)),
        Usability::Revalidate => {
            let route = config.route_for(keyed.parts.uri.path());
            let windows = freshness::stale_windows(&stored, route);
            let stale = age >= entry.lifetime;
            let stale_by = age.saturating_sub(entry.lifetime);
            let wants_fresh = request_directives.no_cache
                || request_directives.max_age.is_some()
                || request_directives.min_fresh.is_some();
            if stale
                && !wants_fresh
                && windows.while_revalidate > 0
                && stale_by <= windows.while_revalidate
            {
                config
                    .store
                    .counters
                    .stale_hits
                    .fetch_add(1, Ordering::Relaxed);
                let mut status = CacheStatus::hit(entry.ttl(now_ms), tier);
                status.fwd = Some("stale");
                status.details.push("stale-while-revalidate");
                let response = serve(&entry, &keyed.parts, age, status);
                refresh_in_background(config, inner, request, entry, keyed, tier);
                return Ok(response);
            }
            // Fresh but refused by the request's own directives: fwd=request.
            let reason = if request_directives.no_cache || !stale && !stored.no_cache {
                "request"
            } else {
                "stale"
            };
            let stale_if_error = stale
                && !request_directives.no_cache
                && windows.if_error > 0
                && stale_by <= windows.if_error;
            let status = CacheStatus::forward(reason, tier);
            match coalescing(&config, &keyed) {
                Some(max_wait) => {
                    let revalidation = revalidation::Revalidation {
                        entry,
                        status,
                        stale_if_error,
                        max_wait,
                    };
                    Box::pin(revalidation::coalesced(
                        &config,
                        inner,
                        request,
                        &keyed,
                        revalidation,
                    ))
                    .await
                }
                None => {
                    Box::pin(revalidate(
                        &config,
                        inner,
                        request,
                        entry,
                        &keyed,
                        status,
                        stale_if_error,
                        Fill::none(),
                    ))
                    .await
                }
            }
        }
    }
}

/// Refreshes a stale entry once: one background request per instance (an
/// in-process flight) and across instances (a Redis lock that also sees a
/// refresh another instance already stored).
fn refresh_in_background<S, ReqBody, ResBody>(
    config: Arc<Config>,
    inner: S,
    request: Request<ReqBody>,
    entry: Entry,
    keyed: Keyed,
    tier: Tier,
) where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    let Joined::Leader(guard) = config.flights.join(&format!("r:{}", keyed.flight_key())) else {
        return;
    };
    let in_flight = config.store.start_store();
    tokio::spawn(
        async move {
            let _in_flight = in_flight;
            let variant =
                config
                    .store
                    .known_variant(&keyed.url_hash, &keyed.parts.headers, &keyed.extra);
            let purpose = LockPurpose::Refresh(entry.response_time_ms);
            let lock = match config
                .store
                .try_lock(&keyed.url_hash, variant.as_deref(), purpose)
                .await
            {
                LockAttempt::Acquired(lock) => Some(lock),
                LockAttempt::Unavailable => None,
                LockAttempt::Held | LockAttempt::Filled => return,
            };
            let fill = Fill {
                guard: Some(guard),
                lock,
            };
            let status = CacheStatus::forward("stale", tier);
            let refreshed =
                revalidate(&config, inner, request, entry, &keyed, status, false, fill).await;
            if let Ok(response) = refreshed {
                // Read to its end: a body dropped early is a client that
                // left, and nothing would be stored.
                let _ = response.into_body().collect().await;
            }
        }
        .in_current_span(),
    );
}

/// A miss with coalescing: one request per instance leads (the others
/// follow it in process); among the instances' leaders, the one that takes
/// the Redis fill lock goes to the origin and the others wait for its entry.
/// A request whose own answer could not be stored (or, with
/// `Authorization`, seldom can) never leads: it follows a flight under
/// way, or goes to the origin on its own.
async fn coalesced_miss<S, ReqBody, ResBody>(
    config: &Arc<Config>,
    inner: S,
    request: Request<ReqBody>,
    keyed: &Keyed,
    status: CacheStatus,
    max_wait: Duration,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    let store = &config.store;
    let deadline = tokio::time::Instant::now() + max_wait;
    let flight_key = keyed.flight_key();
    let joined = if !request::may_lead(config, &keyed.parts, &keyed.directives) {
        config.flights.follow(&flight_key).map(Joined::Follower)
    } else {
        Some(config.flights.join(&flight_key))
    };
    let guard = match joined {
        None => {
            return forward_and_store(config, inner, request, keyed, status, Fill::none()).await;
        }
        Some(Joined::Follower(flight)) => {
            let shared = tokio::time::timeout_at(deadline, coalesce::wait(flight)).await;
            if let Ok(Outcome::Done(Some(entry))) = shared {
                return Ok(serve_coalesced(config, &entry, keyed, Tier::Redis));
            }
            // The leader stored nothing this request can use (or took too
            // long): look again, then go to the origin.
            if let (Lookup::Hit(entry), tier) = store
                .lookup(&keyed.url_hash, &keyed.parts.headers, &keyed.extra)
                .await
            {
                return Ok(serve_coalesced(config, &entry, keyed, tier));
            }
            return forward_and_store(config, inner, request, keyed, status, Fill::none()).await;
        }
        Some(Joined::Leader(guard)) => guard,
    };
    let mut poll = Duration::from_millis(10);
    loop {
        let variant = store.known_variant(&keyed.url_hash, &keyed.parts.headers, &keyed.extra);
        let lock = match store
            .try_lock(&keyed.url_hash, variant.as_deref(), LockPurpose::Fill)
            .await
        {
            LockAttempt::Acquired(lock) => Some(lock),
            LockAttempt::Unavailable => None,
            LockAttempt::Held | LockAttempt::Filled => {
                // Another instance fills: wait for its announcement (or poll,
                // in case the message is lost), then look again.
                let updated = store.bus.updated();
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    tracing::debug!(target: "tower_redis_cache", "coalescing wait exceeded; going to the origin");
                    None
                } else {
                    let _ = tokio::time::timeout_at(deadline.min(now + poll), updated).await;
                    poll = (poll * 2).min(Duration::from_millis(250));
                    if let (Lookup::Hit(entry), tier) = store
                        .lookup(&keyed.url_hash, &keyed.parts.headers, &keyed.extra)
                        .await
                    {
                        let shared = key::vary_names(&entry.headers)
                            .unwrap_or_default()
                            .is_empty()
                            .then(|| Arc::new(entry.clone()));
                        guard.complete(shared);
                        return Ok(serve_coalesced(config, &entry, keyed, tier));
                    }
                    continue;
                }
            }
        };
        let fill = Fill {
            guard: Some(guard),
            lock,
        };
        return forward_and_store(config, inner, request, keyed, status, fill).await;
    }
}

/// An entry another request just fetched.
pub(crate) fn serve_coalesced<B: Body>(
    config: &Config,
    entry: &Entry,
    keyed: &Keyed,
    tier: Tier,
) -> Response<CacheBody<B>> {
    config
        .store
        .counters
        .coalesced
        .fetch_add(1, Ordering::Relaxed);
    let now_ms = freshness::epoch_ms(SystemTime::now());
    let mut status = CacheStatus::hit(entry.ttl(now_ms), tier);
    status.details.push("coalesced");
    serve(entry, &keyed.parts, entry.age(now_ms), status)
}

pub(crate) async fn forward_and_store<S, ReqBody, ResBody>(
    config: &Arc<Config>,
    mut inner: S,
    request: Request<ReqBody>,
    keyed: &Keyed,
    status: CacheStatus,
    fill: Fill,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    let request_time = SystemTime::now();
    let response = match inner.call(request).await {
        Ok(response) => response,
        Err(error) => {
            fill.release(config, &keyed.url_hash);
            return Err(error);
        }
    };
    Ok(store_if_allowed(
        config,
        keyed,
        response,
        request_time,
        status,
        fill,
    ))
}

/// Sends a conditional request for a stale entry: a 304 refreshes the entry
/// (RFC 9111 §4.3.4) and it is served; anything else is a fresh response.
/// With `stale_if_error`, an origin error, a 500/502/503/504 or no answer
/// within the origin timeout serves the stale entry instead (RFC 5861).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn revalidate<S, ReqBody, ResBody>(
    config: &Arc<Config>,
    mut inner: S,
    mut request: Request<ReqBody>,
    entry: Entry,
    keyed: &Keyed,
    status: CacheStatus,
    stale_if_error: bool,
    fill: Fill,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    // The client's own conditionals are answered here, from the result.
    let client_parts = &keyed.parts;
    let headers = request.headers_mut();
    for name in [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
    ] {
        headers.remove(name);
    }
    if let Some(etag) = entry.headers.get(header::ETAG) {
        headers.insert(header::IF_NONE_MATCH, etag.clone());
    }
    if let Some(modified) = entry.headers.get(header::LAST_MODIFIED) {
        headers.insert(header::IF_MODIFIED_SINCE, modified.clone());
    }
    let request_time = SystemTime::now();
    let call = inner.call(request);
    let answer = match config.origin_timeout.filter(|_| stale_if_error) {
        Some(limit) => tokio::time::timeout(limit, call).await.ok(),
        None => Some(call.await),
    };
    let failed = match &answer {
        None => Some(None),
        Some(Err(_)) => Some(None),
        Some(Ok(response)) if is_server_failure(response.status()) => Some(Some(response.status())),
        Some(Ok(_)) => None,
    };
    if let (true, Some(fwd_status)) = (stale_if_error, failed) {
        fill.fail(config, &keyed.url_hash, fwd_status);
        return Ok(serve_stale_if_error(
            config,
            &entry,
            client_parts,
            status.tier,
            fwd_status,
        ));
    }
    let response = match answer {
        Some(Ok(response)) => response,
        Some(Err(error)) => {
            fill.fail(config, &keyed.url_hash, None);
            return Err(error);
        }
        // Unreachable: a timeout only applies with stale_if_error.
        None => {
            fill.release(config, &keyed.url_hash);
            return Ok(gateway_timeout(status.tier));
        }
    };
    if response.status() != StatusCode::NOT_MODIFIED {
        let status = status.with_fwd_status(response.status());
        return Ok(store_if_allowed(
            config,
            keyed,
            response,
            request_time,
            status,
            fill,
        ));
    }
    // §4.3.4: the stored response, with the 304's header fields.
    let response_time = SystemTime::now();
    let (mut not_modified, _) = response.into_parts();
    let route = config.route_for(client_parts.uri.path());
    let mut tags = stored_tags(&entry.headers);
    tags.extend(take_tags(config, route, client_parts, &mut not_modified));
    let mut refreshed = entry;
    // Every line of each field the 304 sends replaces the stored lines.
    for name in not_modified.headers.keys() {
        if name != header::CONTENT_LENGTH && !HOP_BY_HOP.contains(name) {
            refreshed.headers.remove(name);
        }
    }
    for (name, value) in &not_modified.headers {
        if name != header::CONTENT_LENGTH && !HOP_BY_HOP.contains(name) {
            refreshed.headers.append(name.clone(), value.clone());
        }
    }
    let as_stored = response_parts(refreshed.status, refreshed.headers.clone());
    let mut status = status.with_fwd_status(StatusCode::NOT_MODIFIED);
    let unkeyed = request::carries_unkeyed_header(config, client_parts);
    let storable = freshness::storable(
        client_parts,
        &keyed.directives,
        &as_stored,
        &config.rules,
        route,
        response_time,
    );
    if let (false, Ok(storable)) = (unkeyed, storable) {
        refreshed.response_time_ms = freshness::epoch_ms(response_time);
        refreshed.initial_age =
            freshness::initial_age(&not_modified.headers, request_time, response_time);
        refreshed.lifetime = storable.lifetime;
        set_stored_tags(&mut refreshed.headers, &tags);
        let vary = key::vary_names(&refreshed.headers).unwrap_or_default();
        let put = Put {
            url_hash: keyed.url_hash.clone(),
            url: keyed.url.clone(),
            variant: key::variant(&vary, &client_parts.headers, &keyed.extra),
            vary,
            keep_for: keep_for(config, route, &refreshed, storable.lifetime),
            entry: refreshed.clone(),
            tags,
        };
        let shared = put.vary.is_empty().then(|| Arc::new(refreshed.clone()));
        config.store.put(put, fill.lock).await;
        if let Some(guard) = fill.guard {
            guard.complete(shared);
        }
        status.stored = true;
    } else {
        fill.release(config, &keyed.url_hash);
    }
    let age = refreshed.age(freshness::epoch_ms(SystemTime::now()));
    Ok(serve(&refreshed, client_parts, age, status))
}

/// A stale entry served because the origin failed (an error, or
/// `fwd_status`), as RFC 5861's `stale-if-error` allows.
pub(crate) fn serve_stale_if_error<B: Body>(
    config: &Config,
    entry: &Entry,
    request: &Parts,
    tier: Tier,
    fwd_status: Option<StatusCode>,
) -> Response<CacheBody<B>> {
    let now_ms = freshness::epoch_ms(SystemTime::now());
    let mut stale = CacheStatus::hit(entry.ttl(now_ms), tier);
    stale.fwd = Some("stale");
    stale.fwd_status = fwd_status;
    stale.details.push("stale-if-error");
    config
        .store
        .counters
        .stale_hits
        .fetch_add(1, Ordering::Relaxed);
    serve(entry, request, entry.age(now_ms), stale)
}

fn is_server_failure(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
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

/// An unsafe method: forwarded, and on success its target (and same-origin
/// `Location` / `Content-Location`) is invalidated (RFC 9111 §4.4).
async fn invalidating<S, ReqBody, ResBody>(
    config: &Config,
    mut inner: S,
    request: Request<ReqBody>,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    let (parts, ()) = head_only(&request);
    // Behind a trusted proxy the entries of this URL are keyed by the host
    // the proxy reports; the request's own host is invalidated as well, as
    // over-invalidating only costs a miss.
    let mut heads = vec![parts];
    if let Ok(Some((_, view))) = request::forwarded_origin(config, &request)
        && let Some(host) = &view.host
    {
        heads.push(key::with_host(&heads[0], host));
    }
    let response = inner.call(request).await?;
    let status = response.status();
    if status.is_success() || status.is_redirection() {
        let mut urls = Vec::new();
        for parts in &heads {
            let route = config.route_for(parts.uri.path());
            for url in key::invalidated_urls(parts, &config.allowed_hosts, route) {
                urls.push(key::hash_url(&url));
            }
            for field in [header::LOCATION, header::CONTENT_LOCATION] {
                if let Some(value) = response.headers().get(field).and_then(|v| v.to_str().ok())
                    && let Some(url) =
                        key::same_origin_url(parts, value, &config.allowed_hosts, |path| {
                            config.route_for(path)
                        })
                {
                    urls.push(key::hash_url(&url));
                }
            }
        }
        urls.sort_unstable();
        urls.dedup();
        config.store.invalidate(&urls).await;
    }
    Ok(passthrough(config, response))
}

/// A response from an entry: 304 when the client's validators match.
pub(crate) fn serve<B: Body>(
    entry: &Entry,
    request: &Parts,
    age: u64,
    status: CacheStatus,
) -> Response<CacheBody<B>> {
    let mut headers = entry.headers.clone();
    headers.remove(&STORED_TAGS);
    headers.insert(header::AGE, HeaderValue::from(age));
    add_cache_status(&mut headers, &status);
    if entry.status == StatusCode::OK && not_modified(request, &entry.headers) {
        let mut response = Response::new(CacheBody::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        for name in [
            header::CACHE_CONTROL,
            header::CONTENT_LOCATION,
            header::DATE,
            header::ETAG,
            header::EXPIRES,
            header::VARY,
            header::LAST_MODIFIED,
            header::AGE,
            CACHE_STATUS.clone(),
        ] {
            for value in headers.get_all(&name) {
                response.headers_mut().append(name.clone(), value.clone());
            }
        }
        return response;
    }
    let body = if request.method == Method::HEAD {
        CacheBody::empty()
    } else {
        CacheBody::cached(entry.body.clone())
    };
    let mut response = Response::new(body);
    *response.status_mut() = entry.status;
    *response.headers_mut() = headers;
    response
}

/// Whether the client's `If-None-Match` (or, without it, `If-Modified-Since`)
/// says it already has this response.
fn not_modified(request: &Parts, stored: &HeaderMap) -> bool {
    if let Some(if_none_match) = request.headers.get(header::IF_NONE_MATCH) {
        let Some(etag) = stored.get(header::ETAG).and_then(|e| e.to_str().ok()) else {
            return false;
        };
        let weak = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
        let candidates = String::from_utf8_lossy(if_none_match.as_bytes()).into_owned();
        return candidates.trim() == "*" || candidates.split(',').any(|c| weak(c) == weak(etag));
    }
    let since = request
        .headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| freshness::http_date(v.as_bytes()));
    let modified = stored
        .get(header::LAST_MODIFIED)
        .and_then(|v| freshness::http_date(v.as_bytes()));
    matches!((since, modified), (Some(since), Some(modified)) if modified <= since)
}

/// `only-if-cached` with nothing usable: 504, and nothing was forwarded.
fn gateway_timeout<B: Body>(tier: Tier) -> Response<CacheBody<B>> {
    let mut response = Response::new(CacheBody::empty());
    *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    let mut status = CacheStatus::new(tier);
    status.details.insert(0, "only-if-cached");
    if let Ok(value) = HeaderValue::from_str(&status.render()) {
        response.headers_mut().append(CACHE_STATUS.clone(), value);
    }
    response
}

/// This cache's member of the `Cache-Status` list.
#[derive(Debug, Clone)]
pub(crate) struct CacheStatus {
    hit_ttl: Option<i64>,
    fwd: Option<&'static str>,
    fwd_status: Option<StatusCode>,
    pub(crate) stored: bool,
    pub(crate) tier: Tier,
    /// `detail` tokens: why it was served as it was.
    details: Vec<&'static str>,
}

impl CacheStatus {
    fn new(tier: Tier) -> Self {
        let details = match tier {
            Tier::Degraded => vec!["redis-unavailable"],
            Tier::Near => vec!["near"],
            Tier::Redis => Vec::new(),
        };
        Self {
            hit_ttl: None,
            fwd: None,
            fwd_status: None,
            stored: false,
            tier,
            details,
        }
    }

    fn hit(ttl: i64, tier: Tier) -> Self {
        let mut status = Self::new(tier);
        status.hit_ttl = Some(ttl);
        status
    }

    fn forward(reason: &'static str, tier: Tier) -> Self {
        let mut status = Self::new(tier);
        status.fwd = Some(reason);
        status
    }

    fn with_fwd_status(mut self, status: StatusCode) -> Self {
        self.fwd_status = Some(status);
        self
    }

    fn render(&self) -> String {
        let mut out = String::with_capacity(64);
        out.push_str(CACHE_NAME);
        if let Some(ttl) = self.hit_ttl {
            out.push_str("; hit; ttl=");
            out.push_str(itoa::Buffer::new().format(ttl));
        }
        if let Some(fwd) = self.fwd {
            out.push_str("; fwd=");
            out.push_str(fwd);
        }
        if let Some(status) = self.fwd_status {
            out.push_str("; fwd-status=");
            out.push_str(itoa::Buffer::new().format(status.as_u16()));
        }
        if self.stored {
            out.push_str("; stored");
        }
        match self.details.as_slice() {
            [] => {}
            [one] => {
                out.push_str("; detail=");
                out.push_str(one);
            }
            several => {
                out.push_str("; detail=\"");
                out.push_str(&several.join(" "));
                out.push('"');
            }
        }
        out
    }
}

pub(crate) fn add_cache_status(headers: &mut HeaderMap, status: &CacheStatus) {
    record(status);
    if let Ok(value) = HeaderValue::from_str(&status.render()) {
        headers.append(CACHE_STATUS.clone(), value);
    }
}

#[cfg(feature = "metrics")]
fn record(status: &CacheStatus) {
    let result = match (status.hit_ttl, status.fwd) {
        (Some(_), _) => "hit",
        (None, Some(fwd)) => fwd,
        (None, None) => "none",
    };
    metrics::counter!(
        "tower_redis_cache_requests_total",
        "result" => result,
        "stored" => if status.stored { "true" } else { "false" },
        "degraded" => if status.tier == Tier::Degraded { "true" } else { "false" }
    )
    .increment(1);
}

#[cfg(not(feature = "metrics"))]
fn record(status: &CacheStatus) {
    tracing::trace!(target: "tower_redis_cache", cache_status = %status.render(), "answered");
}

/// RFC 9111 §4.4: unsafe methods, including those whose safety is unknown.
fn is_unsafe(method: &Method) -> bool {
    !method.is_safe()
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The request's head, without its body.
fn head_only<B>(request: &Request<B>) -> (Parts, ()) {
    let mut builder = Request::builder()
        .method(request.method().clone())
        .uri(request.uri().clone())
        .version(request.version());
    if let Some(headers) = builder.headers_mut() {
        *headers = request.headers().clone();
    }
    builder.body(()).unwrap_or_default().into_parts()
}

fn response_parts(status: StatusCode, headers: HeaderMap) -> http::response::Parts {
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = status;
    parts.headers = headers;
    parts
}
