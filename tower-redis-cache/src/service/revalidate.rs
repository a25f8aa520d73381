//! Revalidation: a conditional request for a stale entry; a 304 refreshes
//! the entry (RFC 9111 §4.3.4) and it is served, and so does a 206 of the
//! same representation (the same strong `ETag` and length: §3.4), whose
//! fields replace the stored ones but its `Content-Range` and
//! `Content-Length`; anything else is a fresh response. With `stale_if_error`, an origin error, a 500/502/503/504 or
//! no answer within the origin timeout serves the stale entry (RFC 5861).
//!
//! Revalidations are coalesced the way misses are: a stale entry (or a fresh
//! one that a request's `no-cache` or `max-age` refuses) is revalidated by
//! one request per instance (an in-process flight) and across instances
//! (the URL's Redis lock); the others wait for its result, up to the
//! coalescing wait. Without this, every request for a stale entry, and
//! every `no-cache` request any client sends, is an origin request.
//!
//! A follower is answered with the entry its leader stored, or with an
//! entry stored since its own lookup (a newer response than the one it
//! found: it was fetched from the origin after this request arrived, which
//! is what `no-cache` asks for). When the origin fails while the leader
//! revalidates, followers whose own request allows `stale-if-error` serve
//! their stale entry instead of asking the failing origin again.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, Request, Response, StatusCode, header};
use tokio::sync::watch;
use tokio::time::Instant;

use super::cache_status::CacheStatus;
use super::coalesce::{self, FlightGuard, Joined, Outcome};
use super::hit::{Asked, gateway_timeout, serve, serve_coalesced, serve_stale_if_error};
use super::miss::Fill;
use super::storing::{self, HOP_BY_HOP, put_for, store_if_allowed, tag_headers};
use super::tags::{set_stored_tags, stored_tags, take_tags};
use super::{Answer, Ctx, Exchange, Origin, OriginBody, range, request, response_parts};
use crate::entry::Entry;
use crate::freshness;
use crate::key;
use crate::store::{LockAttempt, LockPurpose, Lookup, Tier};
use tower_redis_core::clock;

/// A revalidation to make, or to wait for.
pub(crate) struct Revalidation {
    /// The entry found, which the origin is asked to validate.
    pub(crate) entry: Entry,
    pub(crate) status: CacheStatus,
    /// The request allows serving the entry if the origin fails.
    pub(crate) stale_if_error: bool,
}

impl<S, ReqBody, ResBody> Exchange<S, ReqBody, ResBody>
where
    S: Origin<ReqBody, ResBody>,
    ReqBody: Send + 'static,
    ResBody: OriginBody,
{
    /// Revalidates an entry a lookup found, coalesced when allowed.
    pub(super) async fn revalidate_found(
        self,
        revalidation: Revalidation,
    ) -> Answer<ResBody, S::Error> {
        match self.ctx.coalescing() {
            Some(max_wait) => Box::pin(self.coalesced(revalidation, max_wait)).await,
            None => Box::pin(self.revalidate(revalidation, Fill::none())).await,
        }
    }

    async fn coalesced(
        self,
        revalidation: Revalidation,
        max_wait: Duration,
    ) -> Answer<ResBody, S::Error> {
        let deadline = Instant::now() + max_wait;
        let flight_key = format!("v:{}", self.ctx.keyed.flight_key());
        // A lookup that fell back while Redis hangs (`waited_in_vain`):
        // Redis failed this request, which has waited for it as long as a
        // request may. It asks Redis for no lock and looks no more (as a
        // miss does: `miss.rs`).
        let waited = self
            .ctx
            .config
            .store
            .waited_in_vain(revalidation.status.tier);
        match self.ctx.join_flight(&flight_key) {
            None => self.revalidate(revalidation, Fill::none()).await,
            Some(Joined::Follower(flight)) => {
                self.follow(flight, revalidation, deadline, waited).await
            }
            Some(Joined::Leader(guard)) if waited => {
                self.revalidate(revalidation, Fill::unlocked(Some(guard), true))
                    .await
            }
            Some(Joined::Leader(guard)) => self.lead(guard, revalidation, deadline).await,
        }
    }

    /// Waits for the in-process leader's revalidation.
    async fn follow(
        self,
        flight: watch::Receiver<Outcome>,
        revalidation: Revalidation,
        deadline: Instant,
        waited: bool,
    ) -> Answer<ResBody, S::Error> {
        let Ctx { config, keyed } = &self.ctx;
        match tokio::time::timeout_at(deadline, coalesce::wait(flight)).await {
            Ok(Outcome::Done(Some(shared))) => {
                return Ok(serve_coalesced(config, &shared, keyed, Tier::Redis));
            }
            Ok(Outcome::Failed(fwd_status)) if revalidation.stale_if_error => {
                return Ok(serve_stale_if_error(
                    config,
                    &revalidation.entry,
                    &keyed.parts,
                    revalidation.status.tier,
                    fwd_status,
                ));
            }
            _ => {}
        }
        // Nothing shared (a `Vary`, a refusal, a timeout): an entry
        // stored since this request's lookup will do, else revalidate.
        // After a lookup that `waited` for Redis in vain, or while Redis
        // hangs (its leader's wait may have been in vain too), the look is
        // in process.
        let waited = waited || config.store.hangs();
        let found_at = revalidation.entry.response_time_ms;
        let (newer, tier) = newer_entry(&self.ctx, found_at, waited).await;
        if let Some(newer) = newer {
            return Ok(serve_coalesced(config, &newer, keyed, tier));
        }
        let fill = Fill::unlocked(None, waited || config.store.waited_in_vain(tier));
        self.revalidate(revalidation, fill).await
    }

    /// Leads the in-process flight: takes the URL's Redis lock and
    /// revalidates, or, while another instance revalidates (or just did),
    /// waits for its announcement (or polls, in case it is lost) and looks
    /// again. A look that falls back ends the wait: Redis failed this
    /// request, which asks it for the lock no more.
    async fn lead(
        self,
        guard: FlightGuard,
        revalidation: Revalidation,
        deadline: Instant,
    ) -> Answer<ResBody, S::Error> {
        let Ctx { config, keyed } = &self.ctx;
        let store = &config.store;
        let found_at = revalidation.entry.response_time_ms;
        let mut poll = Duration::from_millis(10);
        let mut seen_filled = false;
        let mut waited = false;
        let lock = loop {
            let variant =
                store.known_variant(&keyed.key.url_hash, &keyed.parts.headers, &keyed.key.extra);
            let updated = store.bus.updated();
            let purpose = LockPurpose::Refresh(found_at);
            let attempt = match store
                .try_lock(&keyed.key.url_hash, variant.as_deref(), purpose)
                .await
            {
                LockAttempt::Acquired(lock) => break Some(lock),
                attempt @ LockAttempt::Unavailable => {
                    waited = store.lock_waited_in_vain(&attempt);
                    break None;
                }
                attempt @ (LockAttempt::Held | LockAttempt::Filled) => attempt,
            };
            let now = Instant::now();
            if now >= deadline {
                tracing::debug!(target: "tower_redis_cache", "coalescing wait exceeded; revalidating");
                break None;
            }
            // An entry just stored is looked up at once, the first time.
            if matches!(attempt, LockAttempt::Held) || seen_filled {
                let _ = tokio::time::timeout_at(deadline.min(now + poll), updated).await;
                poll = (poll * 2).min(Duration::from_millis(250));
            }
            seen_filled |= matches!(attempt, LockAttempt::Filled);
            let (newer, tier) = newer_entry(&self.ctx, found_at, false).await;
            if let Some(newer) = newer {
                let shared = key::vary_names(&newer.headers)
                    .unwrap_or_default()
                    .is_empty()
                    .then(|| Arc::new(newer.clone()));
                guard.complete(shared);
                return Ok(serve_coalesced(config, &newer, keyed, tier));
            }
            if tier == Tier::Degraded {
                waited = store.waited_in_vain(tier);
                break None;
            }
        };
        let fill = Fill {
            guard: Some(guard),
            lock,
            own_write: false,
            waited,
        };
        self.revalidate(revalidation, fill).await
    }

    /// Sends the conditional request for a stale entry and answers with
    /// its result (see the module's documentation).
    pub(crate) async fn revalidate(
        self,
        revalidation: Revalidation,
        mut fill: Fill,
    ) -> Answer<ResBody, S::Error> {
        let (ctx, mut inner, mut request) = self.into_parts();
        let Revalidation {
            entry,
            status,
            stale_if_error,
        } = revalidation;
        // A lookup that fell back while Redis hangs: what this request
        // stores does not ask Redis again (`put_caught_up` still does when
        // it holds the lock: Redis answered it since).
        fill.waited |= ctx.config.store.waited_in_vain(status.tier);
        // The client's own conditionals are answered here, from the result.
        make_conditional(&mut request, &entry.headers);
        let request_time = SystemTime::now();
        let call = inner.call(request);
        let answer = match ctx.config.origin_timeout.filter(|_| stale_if_error) {
            Some(limit) => tokio::time::timeout(limit, call).await.ok(),
            None => Some(call.await),
        };
        let failed = match &answer {
            None => Some(None),
            Some(Err(_)) => Some(None),
            Some(Ok(response)) if is_server_failure(response.status()) => {
                Some(Some(response.status()))
            }
            Some(Ok(_)) => None,
        };
        if let (true, Some(fwd_status)) = (stale_if_error, failed) {
            fill.fail(&ctx, fwd_status);
            let (config, parts) = (&ctx.config, &ctx.keyed.parts);
            return Ok(serve_stale_if_error(
                config,
                &entry,
                parts,
                status.tier,
                fwd_status,
            ));
        }
        let response = match answer {
            Some(Ok(response)) => response,
            Some(Err(error)) => {
                fill.fail(&ctx, None);
                return Err(error);
            }
            // Unreachable: a timeout only applies with stale_if_error.
            None => {
                fill.release(&ctx);
                return Ok(gateway_timeout(status.tier));
            }
        };
        // §3.4, §4.3.4: a 206 of the very representation stored (the same
        // strong validator, the same length) updates the stored response's
        // fields like a 304; its body, a part of the stored one, is dropped.
        let updates = response.status() == StatusCode::NOT_MODIFIED
            || (response.status() == StatusCode::PARTIAL_CONTENT
                && partial_of(&entry, response.headers()));
        if !updates {
            let status = status.with_fwd_status(response.status());
            return Ok(store_if_allowed(&ctx, response, request_time, status, fill));
        }
        let fwd_status = response.status();
        let validated = Validated {
            entry,
            not_modified: response.into_parts().0,
            request_time,
        };
        Ok(validated.refresh(&ctx, status, fill, fwd_status).await)
    }
}

/// Replaces the client's conditionals with the entry's validators.
fn make_conditional<B>(request: &mut Request<B>, stored: &HeaderMap) {
    let headers = request.headers_mut();
    request::remove_conditionals(headers);
    if let Some(etag) = stored.get(header::ETAG) {
        headers.insert(header::IF_NONE_MATCH, etag.clone());
    }
    if let Some(modified) = stored.get(header::LAST_MODIFIED) {
        headers.insert(header::IF_MODIFIED_SINCE, modified.clone());
    }
}

/// An entry the origin answered 304 (or a 206 of it) for.
struct Validated {
    entry: Entry,
    not_modified: http::response::Parts,
    request_time: SystemTime,
}

impl Validated {
    /// §4.3.4: the stored response, with the 304's header fields; stored
    /// again when it still may be, and served.
    async fn refresh<B: http_body::Body>(
        self,
        ctx: &Ctx,
        status: CacheStatus,
        fill: Fill,
        fwd_status: StatusCode,
    ) -> Response<crate::body::CacheBody<B>> {
        let Ctx { config, keyed } = ctx;
        let Validated {
            mut entry,
            mut not_modified,
            request_time,
        } = self;
        let client_parts = &keyed.parts;
        let response_time = SystemTime::now();
        let route = config.route_for(client_parts.uri.path());
        let mut tags = stored_tags(&entry.headers);
        tags.extend(take_tags(
            &tag_headers(config),
            route,
            client_parts,
            &mut not_modified,
        ));
        // The 304's own `Age` (if any) is the one that counts (§5.1).
        entry.headers.remove(header::AGE);
        let mut refreshed = merge_fields(entry, &not_modified.headers);
        let as_stored = response_parts(refreshed.status, refreshed.headers.clone());
        let mut status = status.with_fwd_status(fwd_status);
        // The checks of the request that storing a response makes (a
        // `304` to the request's own conditionals cannot come here: a
        // revalidation sends the entry's).
        let unkeyed = request::carries_unkeyed_header(config, client_parts)
            || storing::spelled_otherwise(client_parts, route, &as_stored.headers);
        let storable = freshness::storable(
            client_parts,
            &keyed.key.directives,
            &as_stored,
            &config.rules,
            route,
            response_time,
        );
        if let (false, Ok(storable)) = (unkeyed, storable) {
            refreshed.headers.remove(header::AGE);
            refreshed.response_time_ms = clock::epoch_ms(response_time);
            refreshed.initial_age =
                freshness::initial_age(&not_modified.headers, request_time, response_time);
            refreshed.lifetime = storable.lifetime;
            set_stored_tags(&mut refreshed.headers, &tags);
            // The stored copy (and the coalesced followers) without a
            // `Set-Cookie` the response qualified out; this client still
            // gets the cookie its 304 set for it.
            let put = put_for(
                config,
                keyed,
                route,
                &client_parts.headers,
                refreshed.clone(),
                &storable,
                tags,
                Some(request_time),
            );
            let shared = (put.vary.is_empty() && !put.entry.is_partial())
                .then(|| Arc::new(put.entry.clone()));
            config
                .store
                .put_caught_up(put, fill.lock, !fill.waited)
                .await;
            if let Some(guard) = fill.guard {
                guard.complete(shared);
            }
            status.stored = true;
        } else {
            fill.release(ctx);
        }
        let age = refreshed.age(clock::now_ms());
        serve(&refreshed, Asked::of(client_parts), age, status)
    }
}

/// The stored entry with the fields of a 304, or of a 206 of the same
/// representation (§3.4, §4.3.4): every line of each field the response
/// sends replaces the stored lines, the fields it does not send are kept.
/// Not taken: what describes the response itself rather than the
/// representation (`Content-Length`, `Content-Range`, a
/// `multipart/byteranges` `Content-Type`, hop-by-hop fields).
pub(crate) fn merge_fields(mut entry: Entry, update: &HeaderMap) -> Entry {
    let taken = |name: &HeaderName| {
        name != header::CONTENT_LENGTH
            && name != header::CONTENT_RANGE
            && !HOP_BY_HOP.contains(name)
            && !(name == header::CONTENT_TYPE
                && update.get_all(name).iter().any(range::is_multipart))
    };
    for name in update.keys() {
        if taken(name) {
            entry.headers.remove(name);
        }
    }
    for (name, value) in update {
        if taken(name) {
            entry.headers.append(name.clone(), value.clone());
        }
    }
    entry
}

/// Whether a `206` is a part of a stored complete response: both have the
/// same strong `ETag` and the 206's `Content-Range` names the stored
/// body's length.
fn partial_of(entry: &Entry, partial: &HeaderMap) -> bool {
    let same_tag = matches!(
        (range::strong_etag(&entry.headers), range::strong_etag(partial)),
        (Some(stored), Some(new)) if stored.as_bytes().trim_ascii() == new.as_bytes().trim_ascii()
    );
    entry.status == StatusCode::OK
        && same_tag
        && range::content_range(partial)
            .is_some_and(|span| span.complete == entry.body.len() as u64)
}

fn is_server_failure(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

/// The entry the request selects, when it was stored after the one the
/// request found (stored at `found_at`): a response the origin gave after
/// this request's lookup; and the tier the look read (see
/// `CacheStore::look_again` for `waited`).
async fn newer_entry(ctx: &Ctx, found_at: u64, waited: bool) -> (Option<Entry>, Tier) {
    let Ctx { config, keyed } = ctx;
    let (url_hash, headers, extra) = (&keyed.key.url_hash, &keyed.parts.headers, &keyed.key.extra);
    match config
        .store
        .look_again(url_hash, headers, extra, waited)
        .await
    {
        (Lookup::Hit(entry), tier) if entry.response_time_ms > found_at && !entry.is_partial() => {
            (Some(entry), tier)
        }
        (_, tier) => (None, tier),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_304_replaces_every_line_of_its_fields_but_not_its_length() {
        let mut entry = Entry {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: bytes::Bytes::from_static(b"page"),
            response_time_ms: 0,
            initial_age: 0,
            lifetime: 60,
        };
        entry.headers.append("x-a", "1".parse().unwrap());
        entry.headers.append("x-a", "2".parse().unwrap());
        entry.headers.insert("content-length", "4".parse().unwrap());
        entry.headers.insert("x-kept", "k".parse().unwrap());
        let mut not_modified = HeaderMap::new();
        not_modified.insert("x-a", "3".parse().unwrap());
        not_modified.insert("content-length", "0".parse().unwrap());
        not_modified.insert("connection", "close".parse().unwrap());
        let merged = merge_fields(entry, &not_modified);
        let a: Vec<_> = merged.headers.get_all("x-a").iter().collect();
        assert_eq!(a, ["3"]);
        assert_eq!(merged.headers["content-length"], "4");
        assert_eq!(merged.headers["x-kept"], "k");
        assert!(!merged.headers.contains_key("connection"));
    }

    /// RFC 9111 §3.4, §4.3.4: a 206 of the stored representation gives its
    /// fields, but not those that describe the part it carries.
    #[test]
    fn a_206_gives_its_fields_but_not_those_of_its_part() {
        let mut entry = Entry {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: bytes::Bytes::from_static(b"0123456789"),
            response_time_ms: 0,
            initial_age: 0,
            lifetime: 60,
        };
        entry
            .headers
            .insert("content-length", "10".parse().unwrap());
        entry
            .headers
            .insert("content-type", "video/mp4".parse().unwrap());
        entry.headers.insert("x-old", "1".parse().unwrap());
        let mut part = HeaderMap::new();
        part.insert("content-range", "bytes 0-3/10".parse().unwrap());
        part.insert("content-length", "4".parse().unwrap());
        part.insert(
            "content-type",
            "multipart/byteranges; boundary=x".parse().unwrap(),
        );
        part.insert("x-old", "2".parse().unwrap());
        let merged = merge_fields(entry.clone(), &part);
        assert_eq!(merged.headers["content-length"], "10");
        assert_eq!(merged.headers["content-type"], "video/mp4");
        assert!(!merged.headers.contains_key("content-range"));
        assert_eq!(merged.headers["x-old"], "2");
        part.insert("content-type", "video/webm".parse().unwrap());
        assert_eq!(
            merge_fields(entry, &part).headers["content-type"],
            "video/webm"
        );
    }
}
