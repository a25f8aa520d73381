//! Storing a response: whether RFC 9111, the route and the request allow
//! it, the entry (tags, retention, `ETag`) and the body, read for the
//! cache at the origin's pace (see `tee.rs`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode, header};
use http_body::Body;
use http_body_util::BodyExt;
use tracing::Instrument;

use super::cache_status::{CacheStatus, add_cache_status};
use super::hit::{self, Asked};
use super::miss::Fill;
use super::tags::{TagHeaders, set_stored_tags, take_tags};
use super::{Ctx, Keyed, OriginBody, range, request, tee};
use crate::body::CacheBody;
use crate::entry::Entry;
use crate::freshness::{self, NotStored, Storable};
use crate::key;
use crate::layer::Config;
use crate::route::Route;
use crate::store::{Put, Tier};
use tower_redis_core::clock;

/// Response headers that describe a connection, not a response: never stored.
pub(crate) const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::TRAILER,
    header::PROXY_AUTHENTICATE,
];

/// How long an entry is kept: its freshness, plus the longest of the
/// layer's stale keep and the stale-while-revalidate / stale-if-error windows.
pub(crate) fn keep_for(config: &Config, route: &Route, entry: &Entry, lifetime: u64) -> Duration {
    let stored = freshness::directives_of(&entry.headers, &config.rules);
    let windows = freshness::stale_windows(&stored, route);
    let stale_keep = config
        .keep_stale_for
        .max(Duration::from_secs(windows.while_revalidate))
        .max(Duration::from_secs(windows.if_error));
    freshness::retention(lifetime, stale_keep)
}

/// The tag sources a layer is configured with.
pub(crate) fn tag_headers(config: &Config) -> TagHeaders<'_> {
    TagHeaders {
        names: &config.tag_headers,
        strip: config.strip_tag_headers,
    }
}

/// Whether a response may be stored: `Err(true)` when the response itself
/// refuses (which says something of its URL), `Err(false)` when the
/// request does (its method, `no-store`, an unkeyed header, `Authorization`,
/// or conditionals the origin answered with `304` or `412`).
fn storability<B: Body>(
    ctx: &Ctx,
    route: &Route,
    response: &http::response::Parts,
    body: &B,
    response_time: SystemTime,
) -> Result<Storable, bool> {
    let Ctx { config, keyed } = ctx;
    let request = &keyed.parts;
    if request::refuses_storage(config, request, &keyed.key.directives) {
        return Err(false);
    }
    if spelled_otherwise(request, route, &response.headers) {
        return Err(false);
    }
    // The answer to the request's conditionals (forwarded when it leads no
    // fill), not to the URL: a `412` with freshness would otherwise be
    // served to every client of the URL.
    if matches!(
        response.status,
        StatusCode::NOT_MODIFIED | StatusCode::PRECONDITION_FAILED
    ) && request::carries_conditionals(&request.headers)
    {
        return Err(false);
    }
    match freshness::storable(
        request,
        &keyed.key.directives,
        response,
        &config.rules,
        route,
        response_time,
    ) {
        Ok(_) if body.size_hint().lower() > config.max_body_bytes as u64 => Err(true),
        Ok(storable) => Ok(storable),
        Err(NotStored::Method | NotStored::Authorization) => Err(false),
        Err(_) => Err(true),
    }
}

/// Whether the request sends a field the answer varies by (its `Vary`, the
/// route's key headers) spelled with `_` for `-`: an origin reading
/// CGI-style names answered for it, but the key would file the answer
/// (or, for a `304`, the stored one it refreshes) under the field's
/// absence.
pub(crate) fn spelled_otherwise(
    request: &http::request::Parts,
    route: &Route,
    response: &http::HeaderMap,
) -> bool {
    request::spells_otherwise(&request.headers, |name| {
        route.key_headers.iter().any(|field| field == name)
            || key::vary_names(response)
                .is_some_and(|names| names.split(',').any(|field| field == name))
    })
}

/// Whether a refused answer's status may be the leading request's own
/// doing rather than the URL's: a client error other than those that
/// describe the URL itself (404, 405, 410, 414, cacheable by default per
/// RFC 9110 §15.1). Any client can send a request its origin rejects (a
/// header the app refuses: `400`, `403`, `406`); when it led the
/// revalidation of an entry the URL has (so its answers are stored), such
/// a refusal does not switch coalescing off for the URL's other clients.
/// A URL with no entry that refuses everyone (a `401` to every visitor not
/// logged in) still stops coalescing, where followers would only wait for
/// nothing.
fn may_be_the_request_s(status: http::StatusCode) -> bool {
    status.is_client_error() && !matches!(status.as_u16(), 404 | 405 | 410 | 414)
}

/// Whether the request was forwarded to revalidate a stored entry (stale,
/// or asked with `no-cache`).
fn revalidates(status: &CacheStatus) -> bool {
    matches!(status.fwd, Some("stale" | "request"))
}

/// Passes a response on, storing a copy when RFC 9111 and the route allow.
pub(crate) fn store_if_allowed<ResBody: OriginBody>(
    ctx: &Ctx,
    response: Response<ResBody>,
    request_time: SystemTime,
    status: CacheStatus,
    fill: Fill,
) -> Response<CacheBody<ResBody>> {
    store(ctx, response, request_time, status, fill, false)
}

/// [`store_if_allowed`]; with `answer_conditionals`, for a request whose
/// conditionals the cache did not send to the origin: a `200` answers them
/// as a hit would, with a `304` when they match it (a body being stored is
/// then read for the entry alone; one that is not, dropped).
pub(crate) fn store<ResBody: OriginBody>(
    ctx: &Ctx,
    response: Response<ResBody>,
    request_time: SystemTime,
    mut status: CacheStatus,
    fill: Fill,
    answer_conditionals: bool,
) -> Response<CacheBody<ResBody>> {
    let Ctx { config, keyed } = ctx;
    let response_time = SystemTime::now();
    let (mut parts, body) = response.into_parts();
    let request = &keyed.parts;
    let route = config.route_for(request.uri.path());
    let tags = take_tags(&tag_headers(config), route, request, &mut parts);
    let storable = match storability(ctx, route, &parts, &body, response_time) {
        Ok(storable) => storable,
        Err(because_of_the_response) => {
            if because_of_the_response
                && fill.leads()
                && !(revalidates(&status) && may_be_the_request_s(parts.status))
            {
                // Nothing will be stored for the requests coalesced on this
                // URL: let the next misses pass instead of waiting in turn.
                // A refusal due to this request alone says nothing of the
                // URL: the next request may well be stored.
                config
                    .uncacheable
                    .insert(keyed.flight_key().into_owned(), ());
            }
            if because_of_the_response
                && status.fwd == Some("uri-miss")
                && status.tier == Tier::Redis
            {
                // Absent from Redis, and its answer not storable: its next
                // lookups need no script.
                config.store.remember_absent(&keyed.key.url_hash);
            }
            fill.release(ctx);
            add_cache_status(&mut parts.headers, &status);
            // The client's conditionals were not sent: answered here too,
            // as the origin would have (the body is not needed then).
            if answer_conditionals && answers_with_not_modified(request, &parts) {
                return hit::not_modified_response(&parts.headers);
            }
            return Response::from_parts(parts, CacheBody::passthrough(body));
        }
    };
    status.stored = true;
    let mut headers = parts.headers.clone();
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    // The age is kept as `initial_age`, and `Age` written anew on each
    // hit: a stored one would only outlive the response it described.
    headers.remove(header::AGE);
    set_stored_tags(&mut headers, &tags);
    let template = Entry {
        status: parts.status,
        headers,
        body: Bytes::new(),
        response_time_ms: clock::epoch_ms(response_time),
        initial_age: freshness::initial_age(&parts.headers, request_time, response_time),
        lifetime: storable.lifetime,
    };
    let put = put_for(
        config,
        keyed,
        route,
        &request.headers,
        template,
        &storable,
        tags,
        (!fill.own_write).then_some(request_time),
    );
    add_cache_status(&mut parts.headers, &status);
    let body = read_and_store(ctx, body, put, fill);
    if answer_conditionals && answers_with_not_modified(request, &parts) {
        read_for_the_entry_alone(body, config.max_body_bytes);
        return hit::not_modified_response(&parts.headers);
    }
    Response::from_parts(parts, body)
}

/// Whether the origin's `200` answers the client's conditionals (which the
/// cache did not send) with a `304`: they match it, as a hit would find.
/// A `Set-Cookie` is for this client: it gets the whole response.
fn answers_with_not_modified(
    request: &http::request::Parts,
    response: &http::response::Parts,
) -> bool {
    response.status == StatusCode::OK
        && !response.headers.contains_key(header::SET_COOKIE)
        && hit::not_modified(Asked::of(request), &response.headers)
}

/// Reads, on a task of its own, a body the cache is storing whose client
/// was answered without it (a `304`).
fn read_for_the_entry_alone<B: OriginBody>(body: CacheBody<B>, max_body_bytes: usize) {
    if !body.is_teed() || body.is_end_stream() {
        return;
    }
    tokio::spawn(read_to_the_entry(body, max_body_bytes).in_current_span());
}

/// Reads a body the cache is storing, for the entry alone: to its end, or
/// until more than an entry may hold has come (then nothing is stored, and
/// the rest is not read). Nothing read is kept here: the body's tee takes
/// what the entry needs.
pub(crate) async fn read_to_the_entry<B: Body<Data = Bytes>>(body: B, max_body_bytes: usize) {
    let mut body = std::pin::pin!(body);
    let mut read = 0_usize;
    while let Some(Ok(frame)) = body.frame().await {
        read = read.saturating_add(frame.data_ref().map_or(0, Bytes::len));
        if read > max_body_bytes {
            return;
        }
    }
}

/// What to store of `entry`, which `storable` allowed: without a
/// `Set-Cookie` the response qualified out, under the variant that the
/// request headers `request` select; asked of the origin at `asked` (`None`
/// for [`Fill::own_write`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn put_for(
    config: &Config,
    keyed: &Keyed,
    route: &Route,
    request: &http::HeaderMap,
    mut entry: Entry,
    storable: &Storable,
    tags: Vec<String>,
    asked: Option<SystemTime>,
) -> Put {
    if storable.directives.drop_set_cookie {
        entry.headers.remove(header::SET_COOKIE);
    }
    let vary = key::vary_names(&entry.headers).unwrap_or_default();
    Put {
        url_hash: keyed.key.url_hash.to_string(),
        url: keyed.key.url.to_string(),
        variant: key::variant(&vary, request, &keyed.key.extra),
        vary,
        keep_for: keep_for(config, route, &entry, storable.lifetime),
        entry,
        tags,
        asked,
    }
}

/// Hands the body to the client while a task of its own reads it at the
/// origin's pace, so the entry is stored (and the coalesced requests
/// woken, and `flush()` done) once the origin has sent it, however slowly
/// the client reads.
fn read_and_store<ResBody: OriginBody>(
    ctx: &Ctx,
    body: ResBody,
    put: Put,
    fill: Fill,
) -> CacheBody<ResBody> {
    let (body, read) = if body.is_end_stream() {
        (CacheBody::passthrough(body), None)
    } else {
        let (reader, writer) = tee::tee(body);
        (CacheBody::teed(reader), Some(writer))
    };
    let max_body_bytes = ctx.config.max_body_bytes;
    let config = Arc::clone(&ctx.config);
    let in_flight = config.store.start_store();
    tokio::spawn(
        async move {
            let _in_flight = in_flight;
            let body = match read {
                None => Some(Bytes::new()),
                Some(writer) => writer.read_ahead(max_body_bytes).await,
            };
            match body {
                Some(body) => store_entry(&config, put, body, fill).await,
                // Too big, failed, with trailers, or its client went away.
                None => fill.release_for(&config, &put.url_hash),
            }
        }
        .in_current_span(),
    );
    body
}

/// Stores an entry whose body has been read in full, then wakes the
/// requests coalesced on it.
async fn store_entry(config: &Arc<Config>, mut put: Put, body: Bytes, fill: Fill) {
    // A body that ended short of (or past) its declared length is not an entry.
    let declared = put
        .entry
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    // A partial entry holds exactly the span its `Content-Range` names.
    let partial = put.entry.is_partial();
    let wrong_span = partial
        && range::content_range(&put.entry.headers)
            .is_none_or(|span| span.len() != body.len() as u64);
    if declared.is_some_and(|len| len != body.len()) || wrong_span {
        fill.release_for(config, &put.url_hash);
        return;
    }
    put.entry.body = body;
    // A tag made from a part would name that part, not the representation.
    if config.generate_etags && !partial && !put.entry.headers.contains_key(header::ETAG) {
        put.entry
            .headers
            .insert(header::ETAG, strong_etag(&put.entry.body));
    }
    // A partial entry is never handed to the requests coalesced on a fill.
    let shared = (put.vary.is_empty() && !partial).then(|| Arc::new(put.entry.clone()));
    config
        .store
        .put_caught_up(put, fill.lock, !fill.waited)
        .await;
    if let Some(guard) = fill.guard {
        guard.complete(shared);
    }
}

fn strong_etag(body: &Bytes) -> HeaderValue {
    let digest = sha1_smol::Sha1::from(&body[..]).digest().to_string();
    HeaderValue::from_str(&format!("\"{digest}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}
