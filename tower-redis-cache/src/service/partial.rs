//! Partial entries (RFC 9111 §3.3, §3.4): a stored `206` holding the span
//! `a..=b` of a representation of `N` bytes (its `Content-Range`).
//!
//! - A range request inside the span is answered from it: `206` with the
//!   right `Content-Range`, one Redis round trip (the lookup's `HMGET`,
//!   which reads the span: the entry holds nothing else). A range past
//!   the end of the representation is answered `416`.
//! - A range that reaches past the span but joins it is completed: the
//!   origin is asked for the missing bytes with `If-Range` set to the
//!   stored strong validator (its strong `ETag`; without any `ETag`, a
//!   `Last-Modified` at least 60 seconds before its `Date`, which RFC 9110
//!   §8.8.2.2 lets a cache treat as strong), and the answer is combined
//!   with the span only when it is a `206` with the same strong validator
//!   and length (under a date, also the same `Content-Type` and
//!   `Content-Encoding`), whose bytes join the span. The combination takes
//!   the new response's fields (but its `Content-Range` and
//!   `Content-Length`) and is stored; once it covers `0..N` it is a
//!   complete `200` entry. Anything else is never
//!   combined: a `200` (the representation changed) is stored whole and
//!   the range cut from it, another `206` replaces the partial entry and is
//!   passed on as the origin sent it.
//! - Any other request (no range, a range apart from the span, a partial
//!   entry without a strong validator, stale, or an `If-Range` the span does
//!   not satisfy) is forwarded, with its range if it has one
//!   (`Cache-Status: fwd=partial`). A request without a range is never
//!   answered from a partial entry.
//!
//! None of these join a coalesced flight: what one range request stores
//! is of no use to a request for other bytes.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::Body;

use super::cache_status::{CacheStatus, add_cache_status};
use super::hit::{Asked, serve};
use super::miss::Fill;
use super::range::{self, RangeRequest, Span};
use super::revalidate::merge_fields;
use super::storing::{put_for, store_if_allowed, tag_headers};
use super::tags::{STORED_TAGS, set_stored_tags, stored_tags, take_tags};
use super::{Answer, Ctx, Exchange, Origin, OriginBody, request, response_parts, tee};
use crate::body::CacheBody;
use crate::entry::Entry;
use crate::freshness::{self, Usability};
use crate::store::Tier;
use tower_redis_core::clock;

/// What a completion asks of the origin: the stored entry, its span and
/// strong validator (`ETag`, or a strong `Last-Modified`), and the bytes the
/// client wants.
struct Completion {
    entry: Entry,
    span: Span,
    validator: HeaderValue,
    wanted: (u64, u64),
}

impl<S, ReqBody, ResBody> Exchange<S, ReqBody, ResBody>
where
    S: Origin<ReqBody, ResBody>,
    ReqBody: Send + 'static,
    ResBody: OriginBody,
{
    /// A partial entry was found (see the module docs).
    pub(super) async fn on_partial(
        self,
        entry: Entry,
        tier: Tier,
        wanted: Option<&RangeRequest>,
    ) -> Answer<ResBody, S::Error> {
        let Ctx { config, keyed } = &self.ctx;
        // A span that disagrees with the stored body is never served.
        let span = range::content_range(&entry.headers)
            .filter(|span| span.len() == entry.body.len() as u64);
        let (Some(span), Some(wanted)) = (span, wanted) else {
            return self.forward_past_partial(wanted, tier).await;
        };
        if !wanted.if_range_allows(&entry.headers) {
            return self.forward_past_partial(Some(wanted), tier).await;
        }
        let now_ms = clock::now_ms();
        let age = entry.age(now_ms);
        let stored = freshness::directives_of(&entry.headers, &config.rules);
        let usable = matches!(
            freshness::usability(age, entry.lifetime, &stored, &keyed.key.directives),
            Usability::Fresh | Usability::StaleAccepted
        );
        match range::resolve(wanted.range, span.complete) {
            None if usable => {
                config.store.counters.hits.fetch_add(1, Ordering::Relaxed);
                let status = CacheStatus::hit(entry.ttl(now_ms), tier);
                return Ok(unsatisfiable(&entry, span, age, &status));
            }
            Some((start, end)) if usable && span.covers(start, end) => {
                config.store.counters.hits.fetch_add(1, Ordering::Relaxed);
                let status = CacheStatus::hit(entry.ttl(now_ms), tier);
                return Ok(serve_part(&entry, span, (start, end), age, &status));
            }
            Some((start, end)) => {
                let asked = Span {
                    first: start,
                    last: end,
                    complete: span.complete,
                };
                let joined_len = span.last.max(end) - span.first.min(start) + 1;
                // Completed only when the span lacks some of the bytes: a
                // range inside an entry that may not be used as it is
                // (stale, or the client's `no-cache`) is forwarded as the
                // client asked, never as a request for "the bytes after
                // the span", which would be empty (`first > last`).
                if let Some(validator) = range::strong_validator(&entry.headers)
                    && !span.covers(start, end)
                    && span.joins(asked)
                    && joined_len <= config.max_body_bytes as u64
                    && !keyed.key.directives.only_if_cached
                {
                    let completion = Completion {
                        entry,
                        span,
                        validator,
                        wanted: (start, end),
                    };
                    return Box::pin(self.complete(completion, tier)).await;
                }
            }
            None => {}
        }
        self.forward_past_partial(Some(wanted), tier).await
    }

    /// Forwards a request the partial entry cannot answer, with its range
    /// when it has one; the answer is stored as any other (a `206`
    /// replacing the partial entry, a `200` as a complete one).
    async fn forward_past_partial(
        mut self,
        wanted: Option<&RangeRequest>,
        tier: Tier,
    ) -> Answer<ResBody, S::Error> {
        if let Some(answer) = self.count_miss(tier) {
            return Ok(answer);
        }
        if let Some(wanted) = wanted {
            wanted.restore(self.request_mut());
        }
        let status = CacheStatus::forward("partial", tier);
        Box::pin(self.forward_and_store(status, Fill::none())).await
    }

    /// Asks the origin for the bytes the client wants that the span lacks,
    /// and combines its answer with the span when it is a part of the same
    /// representation (RFC 9111 §3.4).
    async fn complete(self, completion: Completion, tier: Tier) -> Answer<ResBody, S::Error> {
        let (ctx, mut inner, mut request) = self.into_parts();
        let config = &ctx.config;
        config.store.counters.misses.fetch_add(1, Ordering::Relaxed);
        let Completion {
            entry,
            span,
            validator,
            wanted: (start, end),
        } = completion;
        // The missing bytes: before the span, after it, or both (then the
        // whole range asked, the span included).
        let (first, last) = if start < span.first && end > span.last {
            (start, end)
        } else if start < span.first {
            (start, span.first - 1)
        } else {
            (span.last + 1, end)
        };
        let field = if last + 1 == span.complete {
            format!("bytes={first}-")
        } else {
            format!("bytes={first}-{last}")
        };
        let headers = request.headers_mut();
        request::remove_conditionals(headers);
        headers.insert(header::RANGE, range::header_value(&field));
        headers.insert(header::IF_RANGE, validator.clone());
        let request_time = SystemTime::now();
        let response = inner.call(request).await?;
        let status = CacheStatus::forward("partial", tier).with_fwd_status(response.status());
        // A date is a coarser validator than a tag: two versions of a file
        // can share one (builds that fix file times). The parts are also
        // required to agree on what the bytes are.
        let same_tag = range::has_validator(response.headers(), &validator)
            && (!range::is_date(&validator)
                || [header::CONTENT_TYPE, header::CONTENT_ENCODING]
                    .iter()
                    .all(|name| {
                        entry
                            .headers
                            .get_all(name)
                            .iter()
                            .eq(response.headers().get_all(name).iter())
                    }));
        let part = Some(response.status())
            .filter(|s| *s == StatusCode::PARTIAL_CONTENT && same_tag)
            .and_then(|_| range::content_range(response.headers()))
            .filter(|part| {
                part.complete == span.complete
                    && part.joins(span)
                    && part.last.max(span.last) - part.first.min(span.first)
                        < config.max_body_bytes as u64
            });
        let Some(part) = part else {
            // Not a part of the stored representation: never combined. A
            // `200` (it changed: `If-Range`) is stored whole and the range
            // cut from it; another `206` replaces the partial entry and is
            // passed on as the origin sent it.
            return Ok(store_if_allowed(
                &ctx,
                response,
                request_time,
                status,
                Fill::none(),
            ));
        };
        let (mut parts, body) = response.into_parts();
        let (reader, writer) = tee::tee(body);
        let limit = usize::try_from(part.len()).unwrap_or(usize::MAX);
        let bytes = match writer.read_ahead(limit).await {
            Some(bytes) if bytes.len() as u64 == part.len() => bytes,
            // Shorter or longer than its `Content-Range`, or failed: passed
            // on as it came, and not combined.
            _ => {
                add_cache_status(&mut parts.headers, &status);
                return Ok(Response::from_parts(parts, CacheBody::teed(reader)));
            }
        };
        drop(reader);
        let combined = Combined {
            entry,
            span,
            part,
            bytes,
            request_time,
        };
        Ok(combined
            .store_and_serve(&ctx, parts, status, (start, end))
            .await)
    }
}

/// A stored span and a new part of the same representation that joins it.
struct Combined {
    entry: Entry,
    span: Span,
    part: Span,
    bytes: Bytes,
    request_time: SystemTime,
}

impl Combined {
    /// Stores the combination (a complete `200` once it covers `0..N`) and
    /// answers the client's range from it.
    async fn store_and_serve<B: Body>(
        self,
        ctx: &Ctx,
        mut parts: http::response::Parts,
        mut status: CacheStatus,
        (start, end): (u64, u64),
    ) -> Response<CacheBody<B>> {
        let Ctx { config, keyed } = ctx;
        let Combined {
            entry,
            span,
            part,
            bytes,
            request_time,
        } = self;
        let response_time = SystemTime::now();
        let union = Span {
            first: span.first.min(part.first),
            last: span.last.max(part.last),
            complete: span.complete,
        };
        // Both lengths are at most `max_body_bytes` (checked before the
        // request), so the offsets fit in usize.
        let offset = |at: u64| usize::try_from(at - union.first).unwrap_or(0);
        let mut body = vec![0u8; usize::try_from(union.len()).unwrap_or(0)];
        let stored_at = offset(span.first);
        body[stored_at..stored_at + entry.body.len()].copy_from_slice(&entry.body);
        let new_at = offset(part.first);
        body[new_at..new_at + bytes.len()].copy_from_slice(&bytes);

        let route = config.route_for(keyed.parts.uri.path());
        let mut tags = stored_tags(&entry.headers);
        tags.extend(take_tags(
            &tag_headers(config),
            route,
            &keyed.parts,
            &mut parts,
        ));
        let mut combined = merge_fields(entry, &parts.headers);
        combined.headers.remove(header::AGE);
        combined.body = Bytes::from(body);
        if union.is_whole() {
            combined.status = StatusCode::OK;
            combined.headers.remove(header::CONTENT_RANGE);
        } else {
            combined.status = StatusCode::PARTIAL_CONTENT;
            combined
                .headers
                .insert(header::CONTENT_RANGE, union.content_range());
        }
        combined
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(union.len()));
        combined.response_time_ms = clock::epoch_ms(response_time);
        combined.initial_age = freshness::initial_age(&parts.headers, request_time, response_time);

        let as_stored = response_parts(combined.status, combined.headers.clone());
        let refused = request::refuses_storage(config, &keyed.parts, &keyed.key.directives);
        let storable = freshness::storable(
            &keyed.parts,
            &keyed.key.directives,
            &as_stored,
            &config.rules,
            route,
            response_time,
        );
        if let (false, Ok(storable)) = (refused, storable) {
            combined.lifetime = storable.lifetime;
            set_stored_tags(&mut combined.headers, &tags);
            let put = put_for(
                config,
                keyed,
                route,
                &keyed.parts.headers,
                combined.clone(),
                &storable,
                tags,
                Some(request_time),
            );
            // After a lookup that fell back while Redis hangs, Redis is not
            // asked again (see `Fill::waited`).
            let caught_up = !config.store.waited_in_vain(status.tier);
            config.store.put_caught_up(put, None, caught_up).await;
            status.stored = true;
        }
        let age = combined.age(clock::now_ms());
        if !combined.is_partial() {
            // The whole `200`: the client's range is cut from it on the way
            // out, as from any whole answer.
            return serve(&combined, Asked::of(&keyed.parts), age, status);
        }
        if union.covers(start, end) {
            return serve_part(&combined, union, (start, end), age, &status);
        }
        // The origin sent other bytes than asked: its part, as it is.
        add_cache_status(&mut parts.headers, &status);
        Response::from_parts(parts, CacheBody::cached(bytes))
    }
}

/// The headers of an answer made from a partial entry.
fn answer_headers(entry: &Entry, age: u64, status: &CacheStatus) -> http::HeaderMap {
    let mut headers = entry.headers.clone();
    headers.remove(&STORED_TAGS);
    headers.insert(header::AGE, HeaderValue::from(age));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    add_cache_status(&mut headers, status);
    headers
}

/// The bytes `start..=end` (inside `span`) of a partial entry: `206`.
fn serve_part<B: Body>(
    entry: &Entry,
    span: Span,
    (start, end): (u64, u64),
    age: u64,
    status: &CacheStatus,
) -> Response<CacheBody<B>> {
    let mut headers = answer_headers(entry, age, status);
    let answered = Span {
        first: start,
        last: end,
        complete: span.complete,
    };
    headers.insert(header::CONTENT_RANGE, answered.content_range());
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(answered.len()));
    // Inside the span, which is the body's length: the offsets fit.
    let from = usize::try_from(start - span.first).unwrap_or(0);
    let to = usize::try_from(end - span.first + 1).unwrap_or(0);
    let mut response = Response::new(CacheBody::cached(entry.body.slice(from..to)));
    *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    *response.headers_mut() = headers;
    response
}

/// A range past the end of the representation (RFC 9110 §15.5.17): `416`
/// with its length, which the partial entry knows.
fn unsatisfiable<B: Body>(
    entry: &Entry,
    span: Span,
    age: u64,
    status: &CacheStatus,
) -> Response<CacheBody<B>> {
    let mut headers = answer_headers(entry, age, status);
    for name in [header::CONTENT_TYPE, header::CONTENT_ENCODING] {
        headers.remove(name);
    }
    headers.insert(
        header::CONTENT_RANGE,
        range::header_value(&format!("bytes */{}", span.complete)),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    let mut response = Response::new(CacheBody::empty());
    *response.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
    *response.headers_mut() = headers;
    response
}
