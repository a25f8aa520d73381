//! An entry was found: serve it (fresh, or stale as allowed), serve it
//! stale while refreshing it in the background, or revalidate it. Also the
//! responses made from an entry, whichever path found it.

use std::sync::atomic::Ordering;

use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body::Body;
use tracing::Instrument;

use super::cache_status::{CACHE_STATUS, CacheStatus, add_cache_status};
use super::coalesce::Joined;
use super::miss::Fill;
use super::range::RangeRequest;
use super::revalidate::Revalidation;
use super::storing;
use super::tags::STORED_TAGS;
use super::{Answer, Ctx, Exchange, Keyed, Origin, OriginBody};
use crate::body::CacheBody;
use crate::directives::{RequestDirectives, ResponseDirectives};
use crate::entry::Entry;
use crate::freshness::{self, StaleWindows, Usability};
use crate::key;
use crate::layer::Config;
use crate::store::{LockAttempt, LockPurpose, Tier};
use tower_redis_core::clock;

/// How a stale (or refused) entry is to be used, once it is known that it
/// cannot simply be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StaleUse {
    /// Serve it now and refresh it in the background.
    WhileRevalidate,
    /// Revalidate it; `reason` is the `fwd` parameter, and with
    /// `if_error` the entry is served if the origin fails.
    Revalidate {
        reason: &'static str,
        if_error: bool,
    },
}

/// Decides what to do with an entry that must be revalidated (RFC 9111
/// §4.2.4, RFC 5861): `age` and `lifetime` in seconds.
pub(crate) fn stale_use(
    age: u64,
    lifetime: u64,
    stored: &ResponseDirectives,
    request: &RequestDirectives,
    windows: StaleWindows,
) -> StaleUse {
    let stale = age >= lifetime;
    let stale_by = age.saturating_sub(lifetime);
    let wants_fresh = request.no_cache || request.max_age.is_some() || request.min_fresh.is_some();
    if stale && !wants_fresh && windows.while_revalidate > 0 && stale_by <= windows.while_revalidate
    {
        return StaleUse::WhileRevalidate;
    }
    // Fresh but refused by the request's own directives: fwd=request.
    let reason = if request.no_cache || !stale && !stored.no_cache {
        "request"
    } else {
        "stale"
    };
    let if_error =
        stale && !request.no_cache && windows.if_error > 0 && stale_by <= windows.if_error;
    StaleUse::Revalidate { reason, if_error }
}

impl<S, ReqBody, ResBody> Exchange<S, ReqBody, ResBody>
where
    S: Origin<ReqBody, ResBody>,
    ReqBody: Send + 'static,
    ResBody: OriginBody,
{
    /// A stored entry was found: serve it, serve it stale while refreshing
    /// it in the background, or revalidate it.
    ///
    /// A plain function: a fresh (or stale-while-revalidate) hit is served
    /// here, with nothing to await, and only the paths that wait (a partial
    /// entry, a revalidation) are boxed futures. As an `async fn` it held
    /// its arguments twice and the revalidation's state, all in the future
    /// of every hit.
    pub(super) fn on_hit<'a>(
        self,
        entry: Entry,
        tier: Tier,
        wanted: Option<&'a RangeRequest>,
    ) -> impl Future<Output = Answer<ResBody, S::Error>> + 'a
    where
        S: 'a,
        ReqBody: 'a,
    {
        use futures_util::future::{Either, ready};
        if entry.is_partial() {
            return Either::Right(Either::Left(Box::pin(self.on_partial(entry, tier, wanted))));
        }
        let config = &self.ctx.config;
        let keyed = &self.ctx.keyed;
        let request_directives = &keyed.key.directives;
        let (
            entry,
            Unserved {
                now_ms,
                age,
                stored,
            },
        ) = match serve_fresh(
            config,
            entry,
            None,
            tier,
            request_directives,
            Asked::of(&keyed.parts),
        ) {
            Ok(response) => return Either::Left(ready(Ok(response))),
            Err(unserved) => unserved,
        };
        // It must be revalidated (RFC 9111 §4.2.4, RFC 5861).
        if request_directives.only_if_cached {
            return Either::Left(ready(Ok(gateway_timeout(tier))));
        }
        let route = config.route_for(keyed.parts.uri.path());
        let windows = freshness::stale_windows(&stored, route);
        match stale_use(age, entry.lifetime, &stored, request_directives, windows) {
            StaleUse::WhileRevalidate => {
                config
                    .store
                    .counters
                    .stale_hits
                    .fetch_add(1, Ordering::Relaxed);
                let mut status = CacheStatus::hit(entry.ttl(now_ms), tier);
                status.fwd = Some("stale");
                status.details.push("stale-while-revalidate");
                let response = serve(&entry, Asked::of(&keyed.parts), age, status);
                self.refresh_in_background(entry, tier);
                Either::Left(ready(Ok(response)))
            }
            StaleUse::Revalidate { reason, if_error } => {
                let revalidation = Revalidation {
                    entry,
                    status: CacheStatus::forward(reason, tier),
                    stale_if_error: if_error,
                };
                Either::Right(Either::Right(Box::pin(self.revalidate_found(revalidation))))
            }
        }
    }

    /// Refreshes a stale entry once: one background request per instance
    /// (an in-process flight) and across instances (a Redis lock that also
    /// sees a refresh another instance already stored).
    fn refresh_in_background(self, entry: Entry, tier: Tier) {
        let Ctx { config, keyed } = &self.ctx;
        let Joined::Leader(guard) = config
            .store
            .flights
            .join(&format!("r:{}", keyed.flight_key()), &keyed.key.url_hash)
        else {
            return;
        };
        let in_flight = config.store.start_store();
        tokio::spawn(
            async move {
                let _in_flight = in_flight;
                let Ctx { config, keyed } = &self.ctx;
                let max_body_bytes = config.max_body_bytes;
                let variant = config.store.known_variant(
                    &keyed.key.url_hash,
                    &keyed.parts.headers,
                    &keyed.key.extra,
                );
                let purpose = LockPurpose::Refresh(entry.response_time_ms);
                // After a lookup that fell back while Redis hangs, no lock
                // is asked for (this instance refreshes for itself).
                let waited = config.store.waited_in_vain(tier);
                let attempt = if waited {
                    LockAttempt::Unavailable
                } else {
                    config
                        .store
                        .try_lock(&keyed.key.url_hash, variant.as_deref(), purpose)
                        .await
                };
                let lock = match attempt {
                    LockAttempt::Acquired(lock) => Some(lock),
                    LockAttempt::Unavailable => None,
                    LockAttempt::Held | LockAttempt::Filled => return,
                };
                let fill = Fill {
                    guard: Some(guard),
                    lock,
                    ..Fill::none()
                };
                let revalidation = Revalidation {
                    entry,
                    status: CacheStatus::forward("stale", tier),
                    stale_if_error: false,
                };
                if let Ok(response) = self.revalidate(revalidation, fill).await {
                    // Read for the entry: a body dropped early is a client
                    // that left, and nothing would be stored. Not kept: a
                    // refresh larger than an entry may hold is not read on.
                    storing::read_to_the_entry(response.into_body(), max_body_bytes).await;
                }
            }
            .in_current_span(),
        );
    }
}

/// What a request asks that a response made from an entry depends on.
#[derive(Clone, Copy)]
pub(crate) struct Asked<'a> {
    method: &'a Method,
    headers: &'a HeaderMap,
}

impl<'a> Asked<'a> {
    pub(crate) fn of(request: &'a impl key::Head) -> Self {
        Self {
            method: request.method(),
            headers: request.headers(),
        }
    }
}

/// An entry [`serve_fresh`] did not serve, as it judged it.
pub(super) struct Unserved {
    now_ms: u64,
    age: u64,
    stored: ResponseDirectives,
}

/// Serves a whole entry that is fresh enough for the request (RFC 9111
/// §4.2, §5.2.1), and counts the hit; otherwise gives it back, with what it
/// found (it must be revalidated, or served stale while it is).
/// `stored`: the entry's directives, when the near tier kept them parsed.
#[allow(clippy::result_large_err)]
pub(super) fn serve_fresh<B: Body>(
    config: &Config,
    entry: Entry,
    stored: Option<ResponseDirectives>,
    tier: Tier,
    request_directives: &RequestDirectives,
    asked: Asked<'_>,
) -> Result<Response<CacheBody<B>>, (Entry, Unserved)> {
    let now_ms = clock::now_ms();
    let age = entry.age(now_ms);
    let stored = stored.unwrap_or_else(|| freshness::directives_of(&entry.headers, &config.rules));
    match freshness::usability(age, entry.lifetime, &stored, request_directives) {
        Usability::Fresh | Usability::StaleAccepted if !entry.is_partial() => {
            config.store.counters.hits.fetch_add(1, Ordering::Relaxed);
            let status = CacheStatus::hit(entry.ttl(now_ms), tier);
            Ok(serve_owned(entry, asked, age, status))
        }
        _ => Err((
            entry,
            Unserved {
                now_ms,
                age,
                stored,
            },
        )),
    }
}

/// An entry another request just fetched.
/// Whether a follower may be served `entry` without asking the origin:
/// fresh enough for its own request (RFC 9111 §4.2, §5.2.1), not only for
/// the leader's. An entry that must be revalidated on every use
/// (`no-cache`, `max-age=0`) or a request with `no-cache`, `max-age` or
/// `min-fresh` it does not meet sends the follower to the origin, and so
/// does a partial entry (a follower may want bytes it does not hold).
pub(crate) fn usable_by_follower(config: &Config, entry: &Entry, keyed: &Keyed) -> bool {
    if entry.is_partial() {
        return false;
    }
    let stored = freshness::directives_of(&entry.headers, &config.rules);
    let age = entry.age(clock::now_ms());
    matches!(
        freshness::usability(age, entry.lifetime, &stored, &keyed.key.directives),
        Usability::Fresh | Usability::StaleAccepted
    )
}

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
    let now_ms = clock::now_ms();
    let mut status = CacheStatus::hit(entry.ttl(now_ms), tier);
    status.details.push("coalesced");
    serve(entry, Asked::of(&keyed.parts), entry.age(now_ms), status)
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
    let now_ms = clock::now_ms();
    let mut stale = CacheStatus::hit(entry.ttl(now_ms), tier);
    stale.fwd = Some("stale");
    stale.fwd_status = fwd_status;
    stale.details.push("stale-if-error");
    config
        .store
        .counters
        .stale_hits
        .fetch_add(1, Ordering::Relaxed);
    serve(entry, Asked::of(request), entry.age(now_ms), stale)
}

/// A response from an entry: 304 when the client's validators match.
pub(crate) fn serve<B: Body>(
    entry: &Entry,
    request: Asked<'_>,
    age: u64,
    status: CacheStatus,
) -> Response<CacheBody<B>> {
    serve_with(entry.headers.clone(), entry, request, age, status)
}

/// [`serve`] for an entry the caller no longer needs: its header map moves
/// into the response instead of being copied.
pub(crate) fn serve_owned<B: Body>(
    mut entry: Entry,
    request: Asked<'_>,
    age: u64,
    status: CacheStatus,
) -> Response<CacheBody<B>> {
    // Made with room for the fields `serve_with` adds (`ADDED_FIELDS`),
    // by the decoding or the in-process store's copy.
    let headers = std::mem::take(&mut entry.headers);
    serve_with(headers, &entry, request, age, status)
}

/// The `Age` field's value (see [`remembered`](super::remembered)).
fn age_value(age: u64) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(u64, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    super::remembered(&LAST, &age, || Some(HeaderValue::from(age)))
        .unwrap_or_else(|| HeaderValue::from(age))
}

/// A response from `entry` with `headers`, the entry's own (`entry.headers`
/// is not read: it may have been moved out).
fn serve_with<B: Body>(
    mut headers: HeaderMap,
    entry: &Entry,
    request: Asked<'_>,
    age: u64,
    status: CacheStatus,
) -> Response<CacheBody<B>> {
    headers.remove(&STORED_TAGS);
    headers.insert(header::AGE, age_value(age));
    if entry.status == StatusCode::OK {
        // RFC 9110 §14.3: the cache answers byte ranges of what it stores
        // (`range.rs`), whatever the origin does.
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
    add_cache_status(&mut headers, &status);
    // The validators are the stored ones: only `Age`, `Accept-Ranges`,
    // `Cache-Status` and the tags field differ from `entry.headers`.
    if entry.status == StatusCode::OK && not_modified(request, &headers) {
        return not_modified_response(&headers);
    }
    let body = if *request.method == Method::HEAD {
        // RFC 9110 §9.3.2, §8.6: the fields a GET would have, its length
        // included; left to the empty body, a server writes 0.
        headers
            .entry(header::CONTENT_LENGTH)
            .or_insert_with(|| HeaderValue::from(entry.body.len()));
        CacheBody::empty()
    } else {
        CacheBody::cached(entry.body.clone())
    };
    let mut response = Response::new(body);
    *response.status_mut() = entry.status;
    *response.headers_mut() = headers;
    response
}

/// The `304` for a `200` with `headers` (RFC 9110 §15.4.5): the fields
/// that describe the representation and its caching, and `Cache-Status`.
pub(crate) fn not_modified_response<B: Body>(headers: &HeaderMap) -> Response<CacheBody<B>> {
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
    response
}

/// Whether the client's `If-None-Match` (or, without it, `If-Modified-Since`)
/// says it already has this response. `If-Match` and `If-Unmodified-Since`
/// are not evaluated: a cache may ignore them (RFC 9110 §13.1.1, §13.1.4).
pub(crate) fn not_modified(request: Asked<'_>, stored: &HeaderMap) -> bool {
    if let Some(if_none_match) = request.headers.get(header::IF_NONE_MATCH) {
        let Some(etag) = stored.get(header::ETAG).and_then(|e| e.to_str().ok()) else {
            return false;
        };
        let weak = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
        let candidates = String::from_utf8_lossy(if_none_match.as_bytes()).into_owned();
        return candidates.trim() == "*" || candidates.split(',').any(|c| weak(c) == weak(etag));
    }
    let Some(since) = request
        .headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| freshness::http_date(v.as_bytes()))
    else {
        return false;
    };
    // RFC 9110 §13.1.3: without `Last-Modified`, the stored response's
    // `Date` is when it was last known to be current.
    stored
        .get(header::LAST_MODIFIED)
        .or_else(|| stored.get(header::DATE))
        .and_then(|v| freshness::http_date(v.as_bytes()))
        .is_some_and(|modified| modified <= since)
}

/// `only-if-cached` with nothing usable: 504, and nothing was forwarded.
pub(crate) fn gateway_timeout<B: Body>(tier: Tier) -> Response<CacheBody<B>> {
    let mut response = Response::new(CacheBody::empty());
    *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    let mut status = CacheStatus::new(tier);
    status.lead = Some("only-if-cached");
    if let Ok(value) = HeaderValue::from_str(&status.render()) {
        response.headers_mut().append(CACHE_STATUS.clone(), value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Age` is the response's own, whether the thread made that value
    /// last or not.
    #[test]
    fn each_response_gets_its_own_age() {
        for age in [0, 0, 1, 1, 0, 86_400, u64::MAX, 1] {
            assert_eq!(age_value(age), HeaderValue::from(age));
        }
    }
}
