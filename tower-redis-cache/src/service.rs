//! [`Cache`]: look up, serve or forward, and store what may be stored.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use tower_service::Service;
use tracing::Instrument;

use crate::body::{CacheBody, Recorder};
use crate::directives::{self, RequestDirectives};
use crate::entry::Entry;
use crate::freshness::{self, Usability};
use crate::key;
use crate::layer::Config;
use crate::policy::Route;
use crate::store::{Lookup, Put};

/// The `Cache-Status` field (RFC 9211).
pub(crate) static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
const CACHE_NAME: &str = "tower-redis";

/// Response headers that describe a connection, not a response: never stored.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::TRAILER,
    header::PROXY_AUTHENTICATE,
];

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
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
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
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    let method = request.method().clone();
    if is_unsafe(&method) {
        return invalidating(&config, inner, request).await;
    }
    let cacheable_request = (method == Method::GET || method == Method::HEAD)
        && !is_grpc(request.headers())
        && !request.headers().contains_key(header::RANGE);
    let route = config.route_for(request.uri().path());
    // The request's head is copied once, and only for requests the cache handles.
    let keyed = (cacheable_request && route.enabled)
        .then(|| head_only(&request).0)
        .and_then(|parts| {
            key::url_of(&parts, &config.allowed_hosts, route).map(|url| (parts, url))
        });
    let Some((parts, url)) = keyed else {
        let response = inner.call(request).await?;
        return Ok(response.map(CacheBody::passthrough));
    };

    let keyed = Keyed {
        url_hash: key::hash_url(&url),
        extra: key::extra_key(&parts, route),
        directives: directives::request(&parts.headers),
        parts,
    };
    let request_directives = &keyed.directives;
    let (lookup, degraded) = config
        .store
        .lookup(&keyed.url_hash, &keyed.parts.headers, &keyed.extra)
        .await;
    let now = SystemTime::now();

    let forward_reason = match lookup {
        Lookup::Hit(entry) => {
            let age = entry.age(freshness::epoch_ms(now));
            let stored = freshness::directives_of(&entry.headers, &config.rules);
            match freshness::usability(age, entry.lifetime, &stored, request_directives) {
                Usability::Fresh | Usability::StaleAccepted => {
                    let status = CacheStatus::hit(entry.ttl(freshness::epoch_ms(now)), degraded);
                    return Ok(serve(&entry, &keyed.parts, age, status));
                }
                Usability::Revalidate if request_directives.only_if_cached => {
                    return Ok(gateway_timeout(degraded));
                }
                Usability::Revalidate => {
                    // Fresh but refused by the request's own directives: fwd=request.
                    let fresh = age < entry.lifetime && !stored.no_cache;
                    let reason = if request_directives.no_cache || fresh {
                        "request"
                    } else {
                        "stale"
                    };
                    return revalidate(
                        &config, inner, request, entry, route, &keyed, reason, degraded,
                    )
                    .await;
                }
            }
        }
        Lookup::UriMiss => "uri-miss",
        Lookup::VaryMiss => "vary-miss",
    };
    if request_directives.only_if_cached {
        return Ok(gateway_timeout(degraded));
    }
    let request_time = SystemTime::now();
    let response = inner.call(request).await?;
    Ok(store_if_allowed(
        &config,
        &keyed,
        response,
        route,
        request_time,
        CacheStatus::forward(forward_reason, degraded),
    ))
}

/// A request the cache handles: its head (as the client sent it), where its
/// entries live and what it asks of the cache.
struct Keyed {
    parts: Parts,
    url_hash: String,
    extra: String,
    directives: RequestDirectives,
}

/// Sends a conditional request for a stale entry: a 304 refreshes the entry
/// (RFC 9111 §4.3.4) and it is served; anything else is a fresh response.
#[allow(clippy::too_many_arguments)]
async fn revalidate<S, ReqBody, ResBody>(
    config: &Config,
    mut inner: S,
    mut request: Request<ReqBody>,
    entry: Entry,
    route: &Route,
    keyed: &Keyed,
    reason: &'static str,
    degraded: bool,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes> + Send + 'static,
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
    let response = inner.call(request).await?;
    if response.status() != StatusCode::NOT_MODIFIED {
        let status = CacheStatus::forward(reason, degraded).with_fwd_status(response.status());
        return Ok(store_if_allowed(
            config,
            keyed,
            response,
            route,
            request_time,
            status,
        ));
    }
    // §4.3.4: the stored response, with the 304's header fields.
    let response_time = SystemTime::now();
    let (not_modified, _) = response.into_parts();
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
    let mut status =
        CacheStatus::forward(reason, degraded).with_fwd_status(StatusCode::NOT_MODIFIED);
    let unkeyed = carries_unkeyed_header(config, client_parts);
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
        let vary = key::vary_names(&refreshed.headers).unwrap_or_default();
        let put = Put {
            url_hash: keyed.url_hash.clone(),
            variant: key::variant(&vary, &client_parts.headers, &keyed.extra),
            vary,
            keep_for: freshness::retention(storable.lifetime, config.keep_stale_for),
            entry: refreshed.clone(),
        };
        config.store.put(put).await;
        status.stored = true;
    }
    let age = refreshed.age(freshness::epoch_ms(SystemTime::now()));
    Ok(serve(&refreshed, client_parts, age, status))
}

/// Passes a response on, storing a copy when RFC 9111 and the route allow.
fn store_if_allowed<ResBody>(
    config: &Config,
    keyed: &Keyed,
    response: Response<ResBody>,
    route: &Route,
    request_time: SystemTime,
    mut status: CacheStatus,
) -> Response<CacheBody<ResBody>>
where
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    let response_time = SystemTime::now();
    let (mut parts, body) = response.into_parts();
    let request = &keyed.parts;
    let storable = (request.method == Method::GET && !carries_unkeyed_header(config, request))
        .then(|| {
            freshness::storable(
                request,
                &keyed.directives,
                &parts,
                &config.rules,
                route,
                response_time,
            )
            .ok()
        })
        .flatten()
        .filter(|_| body.size_hint().lower() <= config.max_body_bytes as u64);
    let Some(storable) = storable else {
        add_cache_status(&mut parts.headers, &status);
        return Response::from_parts(parts, CacheBody::passthrough(body));
    };
    status.stored = true;
    let mut headers = parts.headers.clone();
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    let vary = key::vary_names(&headers).unwrap_or_default();
    let (recorder, done) = Recorder::new(config.max_body_bytes);
    let template = Entry {
        status: parts.status,
        headers,
        body: Bytes::new(),
        response_time_ms: freshness::epoch_ms(response_time),
        initial_age: freshness::initial_age(&parts.headers, request_time, response_time),
        lifetime: storable.lifetime,
    };
    let put = Put {
        url_hash: keyed.url_hash.clone(),
        variant: key::variant(&vary, &request.headers, &keyed.extra),
        vary,
        keep_for: freshness::retention(storable.lifetime, config.keep_stale_for),
        entry: template,
    };
    let store_config = StoreJob {
        generate_etags: config.generate_etags,
    };
    let config_store = Arc::clone(&config.store);
    let in_flight = config.store.start_store();
    // Stored once the body has been sent in full; a client that goes away
    // mid-body drops the recorder and nothing is stored.
    tokio::spawn(async move {
        let _in_flight = in_flight;
        if let Ok(body) = done.await {
            let mut put = put;
            // A body that ended short of its declared length is not an entry.
            let declared = put
                .entry
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok());
            if declared.is_some_and(|len| len != body.len()) {
                return;
            }
            put.entry.body = body;
            if store_config.generate_etags && !put.entry.headers.contains_key(header::ETAG) {
                put.entry
                    .headers
                    .insert(header::ETAG, strong_etag(&put.entry.body));
            }
            config_store.put(put).await;
        }
    });
    add_cache_status(&mut parts.headers, &status);
    Response::from_parts(parts, CacheBody::recording(body, recorder))
}

struct StoreJob {
    generate_etags: bool,
}

fn strong_etag(body: &Bytes) -> HeaderValue {
    let digest = sha1_smol::Sha1::from(&body[..]).digest().to_string();
    HeaderValue::from_str(&format!("\"{digest}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
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
{
    let (parts, ()) = head_only(&request);
    let response = inner.call(request).await?;
    let status = response.status();
    if status.is_success() || status.is_redirection() {
        let mut urls = Vec::new();
        let route = config.route_for(parts.uri.path());
        if let Some(url) = key::url_of(&parts, &config.allowed_hosts, route) {
            urls.push(key::hash_url(&url));
        }
        for field in [header::LOCATION, header::CONTENT_LOCATION] {
            if let Some(value) = response.headers().get(field).and_then(|v| v.to_str().ok())
                && let Some(url) =
                    key::same_origin_url(&parts, value, &config.allowed_hosts, |path| {
                        config.route_for(path)
                    })
            {
                urls.push(key::hash_url(&url));
            }
        }
        config.store.invalidate(&urls).await;
    }
    Ok(response.map(CacheBody::passthrough))
}

/// A response from an entry: 304 when the client's validators match.
fn serve<B>(
    entry: &Entry,
    request: &Parts,
    age: u64,
    status: CacheStatus,
) -> Response<CacheBody<B>> {
    let mut headers = entry.headers.clone();
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
fn gateway_timeout<B>(degraded: bool) -> Response<CacheBody<B>> {
    let mut response = Response::new(CacheBody::empty());
    *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    let status = CacheStatus {
        hit_ttl: None,
        fwd: None,
        fwd_status: None,
        stored: false,
        degraded,
    };
    let mut value = status.render();
    value.push_str("; detail=only-if-cached");
    if let Ok(value) = HeaderValue::from_str(&value) {
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
    stored: bool,
    degraded: bool,
}

impl CacheStatus {
    fn hit(ttl: i64, degraded: bool) -> Self {
        Self {
            hit_ttl: Some(ttl),
            fwd: None,
            fwd_status: None,
            stored: false,
            degraded,
        }
    }

    fn forward(reason: &'static str, degraded: bool) -> Self {
        Self {
            hit_ttl: None,
            fwd: Some(reason),
            fwd_status: None,
            stored: false,
            degraded,
        }
    }

    fn with_fwd_status(mut self, status: StatusCode) -> Self {
        self.fwd_status = Some(status);
        self
    }

    fn render(&self) -> String {
        let mut out = String::from(CACHE_NAME);
        if let Some(ttl) = self.hit_ttl {
            out.push_str(&format!("; hit; ttl={ttl}"));
        }
        if let Some(fwd) = self.fwd {
            out.push_str("; fwd=");
            out.push_str(fwd);
        }
        if let Some(status) = self.fwd_status {
            out.push_str(&format!("; fwd-status={}", status.as_u16()));
        }
        if self.stored {
            out.push_str("; stored");
        }
        if self.degraded {
            out.push_str("; detail=redis-unavailable");
        }
        out
    }
}

fn add_cache_status(headers: &mut HeaderMap, status: &CacheStatus) {
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
        "degraded" => if status.degraded { "true" } else { "false" }
    )
    .increment(1);
}

#[cfg(not(feature = "metrics"))]
fn record(status: &CacheStatus) {
    tracing::trace!(target: "tower_redis_cache", cache_status = %status.render(), "answered");
}

/// RFC 9111 §4.4: unsafe methods, including those whose safety is unknown.
/// Whether the request carries a header that can change the origin's answer
/// without being part of the key: its response must not be stored.
fn carries_unkeyed_header(config: &Config, request: &Parts) -> bool {
    config
        .unkeyed_headers
        .iter()
        .any(|h| request.headers.contains_key(h))
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
